"""The run's settings as dataclasses, parsed by `HfArgumentParser` (pat_hf/cli/parser.py).

The reference's flag names work (`--batch-size`, `--lr`, `--epochs`, `--clip-grad`, ...) next to HF's own
(`--output_dir`, `--logging_steps`, ...). Each dataclass checks its own values; none of them starts anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import list_optimizers
from transformers import TrainingArguments

from pat_hf.config.checks import (
    UsageError,
    check_count,
    check_probability,
    check_range,
    json_object,
    require,
)

SCHEDULERS = ("cosine", "step", "tanh", "poly", "constant")
MIXUP_MODES = ("batch", "pair", "elem")


def _help(text: str, *aliases: str) -> dict:
    return {"help": text, "aliases": list(aliases)} if aliases else {"help": text}


@dataclass
class ModelArguments:
    model: str = field(default="resnet18", metadata=_help("student: a timm model name"))
    teacher: str = field(default="deit_tiny_patch16_224", metadata=_help("teacher: a timm model name, '' for none"))
    teacher_pretrained: str = field(default="", metadata=_help(
        "teacher weights: a .safetensors file, a timm/OFA-KD .pth checkpoint, or hf-hub:NAME / local-dir:DIR"))
    use_ema_teacher: bool = field(default=False, metadata=_help("take the EMA weights of a teacher checkpoint"))
    num_classes: int | None = field(default=None, metadata=_help(
        "number of classes (default: read from the dataset's label column)"))
    img_size: int | None = field(default=None, metadata=_help("input size for both models (default: student's)"))
    model_kwargs: str = field(default="{}", metadata=_help("JSON kwargs for the student's timm.create_model"))
    teacher_kwargs: str = field(default="{}", metadata=_help("JSON kwargs for the teacher's timm.create_model"))
    pretrained: bool = field(default=False, metadata=_help("start the student from timm's pretrained weights"))
    initial_checkpoint: str = field(default="", metadata=_help("start the student from this checkpoint"))
    drop: float = field(default=0.0, metadata=_help("student dropout rate before the classifier"))
    drop_path: float | None = field(default=None, metadata=_help("student stochastic depth rate"))

    def __post_init__(self):
        self.model_kwargs = json_object(self.model_kwargs, "--model-kwargs")
        self.teacher_kwargs = json_object(self.teacher_kwargs, "--teacher-kwargs")
        check_count(self.num_classes, "num_classes", at_least=2, none_means="the dataset's")
        check_count(self.img_size, "img_size", none_means="the student's")
        check_probability(self.drop, "drop", one_excluded=True)
        check_probability(self.drop_path, "drop_path", one_excluded=True)


@dataclass
class DataArguments:
    dataset: str = field(default="digits", metadata=_help(
        "digits (scikit-learn's, offline) | cifar100 | imagenet-1k | a local train/val image folder | "
        "a save_to_disk directory | any Hub dataset name", "-d", "--dataset_name"))
    dataset_config_name: str | None = field(default=None, metadata=_help("configuration of a Hub dataset"))
    data_dir: str | None = field(default=None, metadata=_help("root of a local dataset (imagefolder layout)"))
    train_split: str = field(default="train", metadata=_help("training split name"))
    val_split: str | None = field(default=None, metadata=_help(
        "evaluation split (default: validation, or test for CIFAR-100 as the reference)"))
    image_column: str | None = field(default=None, metadata=_help("image column (default: the dataset's)"))
    label_column: str | None = field(default=None, metadata=_help("label column (default: the dataset's)"))
    max_train_samples: int | None = field(default=None, metadata=_help(
        "train on a random subset of N examples, drawn with --data_seed (else --seed); with --streaming, an "
        "epoch of at most N streamed examples"))
    max_eval_samples: int | None = field(default=None, metadata=_help(
        "evaluate on a random subset of N examples, drawn with --data_seed (else --seed); with --streaming, the "
        "first N examples of the evaluation stream shuffled through the buffer"))
    streaming: bool = field(default=False, metadata=_help(
        "read the dataset as it is consumed (datasets' streaming) instead of downloading and preparing it"))
    shuffle_buffer_size: int = field(default=1000, metadata=_help(
        "--streaming: examples each data worker shuffles among (memory: workers x processes x N encoded images)"))
    samples_per_epoch: int | None = field(default=None, metadata=_help(
        "--streaming: examples per epoch, all processes together (default: the split's size when the dataset "
        "says it)"))
    strict_images: bool = field(default=False, metadata=_help(
        "stop at the first unreadable image, naming it (default: skip it with a warning and count it in the logs "
        "and summary.csv as skipped_images)"))
    validation_batch_size: int | None = field(default=None, metadata=_help(
        "evaluation batch size per device (default: the training batch size)", "-vb"))
    crop_pct: float | None = field(default=None, metadata=_help("evaluation center-crop fraction"))
    mean: list[float] = field(default_factory=list, metadata=_help("normalisation mean (default: model's)"))
    std: list[float] = field(default_factory=list, metadata=_help("normalisation std (default: model's)"))
    interpolation: str = field(default="", metadata=_help("evaluation resize interpolation"))
    train_interpolation: str = field(default="random", metadata=_help("training resize interpolation"))
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0], metadata=_help("random-resized-crop scale"))
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3], metadata=_help("random-resized-crop ratio"))
    hflip: float = field(default=0.5, metadata=_help("horizontal flip probability"))
    vflip: float = field(default=0.0, metadata=_help("vertical flip probability"))
    color_jitter: float = field(default=0.4, metadata=_help("color jitter strength"))
    aa: str | None = field(default=None, metadata=_help("auto-augment policy, e.g. rand-m9-mstd0.5-inc1"))
    reprob: float = field(default=0.0, metadata=_help("random erasing probability"))
    remode: str = field(default="pixel", metadata=_help("random erasing mode"))
    recount: int = field(default=1, metadata=_help("random erasing count"))
    mixup: float = field(default=0.0, metadata=_help("mixup alpha (0: off)"))
    cutmix: float = field(default=0.0, metadata=_help("cutmix alpha (0: off)"))
    mixup_prob: float = field(default=1.0, metadata=_help("probability of mixing a batch"))
    mixup_switch_prob: float = field(default=0.5, metadata=_help("probability of cutmix when both are on"))
    mixup_mode: str = field(default="batch", metadata=_help("batch | pair | elem"))
    mixup_off_epoch: int = field(default=0, metadata=_help("stop mixing from this epoch on (0: never)"))
    smoothing: float = field(default=0.1, metadata=_help("label smoothing"))
    bce_loss: bool = field(default=False, metadata=_help("binary cross-entropy instead of (soft) cross-entropy"))
    aug_repeats: int = field(default=0, metadata=_help(
        "repeated augmentation: each image N times per epoch, on different processes (distributed runs only)"))
    label_fraction: float = field(default=1.0, metadata=_help(
        "keep the labels of this fraction of the training examples (per class, drawn with --data_seed, else "
        "--seed); the others are trained with the distillation terms alone"))
    allow_unlabelled: bool = field(default=False, metadata=_help(
        "accept training rows labelled -1 as unlabelled examples (trained with the distillation terms alone)"))

    def __post_init__(self):
        if self.streaming and self.aug_repeats:
            raise UsageError("--aug-repeats repeats indices of a map-style dataset; drop it or --streaming")
        if self.samples_per_epoch is not None and not self.streaming:
            raise UsageError("--samples-per-epoch is for --streaming runs; use --max-train-samples for a subset")
        check_count(self.shuffle_buffer_size, "shuffle_buffer_size")
        check_count(self.max_train_samples, "max_train_samples", none_means="every example")
        check_count(self.max_eval_samples, "max_eval_samples", none_means="every example")
        check_count(self.samples_per_epoch, "samples_per_epoch", none_means="the split's size")
        check_count(self.validation_batch_size, "validation_batch_size", none_means="the training batch size")
        check_range(self.crop_pct, "crop_pct", low=0.0, high=1.0, low_open=True)
        self._check_normalisation()
        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], "scale",
                "takes two area fractions MIN MAX with 0 < MIN <= MAX", self.scale)
        require(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "ratio",
                "takes two aspect ratios MIN MAX with 0 < MIN <= MAX", self.ratio)
        for name in ("hflip", "vflip", "reprob", "mixup_prob", "mixup_switch_prob"):
            check_probability(getattr(self, name), name)
        check_probability(self.smoothing, "smoothing", one_excluded=True)
        for name in ("mixup", "cutmix", "color_jitter"):
            check_range(getattr(self, name), name, low=0.0)
        check_count(self.recount, "recount")
        check_count(self.mixup_off_epoch, "mixup_off_epoch", at_least=0)
        check_count(self.aug_repeats, "aug_repeats", at_least=0)
        require(self.mixup_mode in MIXUP_MODES, "mixup_mode", f"must be one of {', '.join(MIXUP_MODES)}",
                self.mixup_mode)
        require(0 < self.label_fraction <= 1, "label_fraction", "must be in (0, 1]", self.label_fraction)
        if self.label_fraction < 1 and self.streaming:
            raise UsageError("--label-fraction draws a fixed subset of a map-style dataset's rows; drop it or "
                             "--streaming (a stream's -1 rows are unlabelled with --allow-unlabelled)")

    def _check_normalisation(self) -> None:
        """--mean and --std together (one value for every channel, or one per RGB channel), each std > 0: one
        without the other would be completed by the model's or dataset's statistics, unlike what args.yaml says."""
        if bool(self.mean) != bool(self.std):
            given, missing = ("mean", "std") if self.mean else ("std", "mean")
            require(False, given, f"needs --{missing} too: pass both (one value, or one per RGB channel) or neither "
                                  f"(the model's or dataset's statistics)", getattr(self, given))
        for name in ("mean", "std"):
            values = getattr(self, name)
            require(len(values) in (0, 1, 3), name, "takes one value or three (R G B)", values)
            if len(values) == 1:
                setattr(self, name, values * 3)  # recorded (args.yaml, the exported config) per channel
        require(all(v > 0 for v in self.std), "std", "takes values > 0 (images are divided by it)", self.std)


@dataclass
class DistillArguments:
    """Hyper-parameters shared by every distiller (the reference's names)."""

    # The choices are listed from the registry when the parser is built (pat_hf/cli/parser.py).
    distiller: str = field(default="ofa", metadata={"help": "distillation method"})
    gt_loss_weight: float = field(default=1.0, metadata={"help": "weight of the ground-truth (CE) term"})
    kd_loss_weight: float = field(default=1.0, metadata={"help": "weight of the logit distillation term"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KD term"})

    def __post_init__(self):
        check_range(self.kd_temperature, "kd_temperature", low=0.0, low_open=True)
        for name in ("gt_loss_weight", "kd_loss_weight"):
            check_range(getattr(self, name), name, low=0.0)



@dataclass
class RecipeArguments:
    """The reference's recipe knobs that TrainingArguments has no field for."""

    opt: str = field(default="sgd", metadata=_help("timm optimizer name (sgd is SGD with Nesterov momentum)"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    opt_eps: float | None = field(default=None, metadata=_help("optimizer epsilon"))
    opt_betas: list[float] = field(default_factory=list, metadata=_help("optimizer betas"))
    sched: str = field(default="cosine", metadata=_help("timm scheduler: " + " | ".join(SCHEDULERS)))
    sched_on_updates: bool = field(default=False, metadata=_help(
        "update the learning rate after every optimizer step instead of once per epoch"))
    warmup_epochs: int = field(default=3, metadata=_help("linear warmup epochs"))
    warmup_lr: float = field(default=1e-4, metadata=_help("learning rate at the start of warmup"))
    min_lr: float = field(default=1e-6, metadata=_help("lowest learning rate of the schedule"))
    decay_epochs: float = field(default=100, metadata=_help("step scheduler: epochs between decays"))
    decay_rate: float = field(default=0.1, metadata=_help("step scheduler: decay factor", "--dr"))
    cooldown_epochs: int = field(default=0, metadata=_help("epochs at min_lr after the schedule (trained too)"))
    model_ema: bool = field(default=False, metadata=_help("keep an exponential moving average of the student"))
    model_ema_decay: list[float] = field(default_factory=lambda: [0.9998], metadata=_help(
        "EMA decay, one EMA per value"))
    export_ema: bool = field(default=False, metadata=_help("export the (first) EMA student instead of the raw one"))
    amp: bool = field(default=False, metadata=_help("mixed precision: fp16 on CUDA, bf16 on CPU"))
    amp_dtype: str = field(default="float16", metadata=_help("float16 | bfloat16: the --amp type on CUDA"))
    channels_last: bool = field(default=False, metadata=_help("channels-last memory format for models and inputs"))
    resume: bool = field(default=False, metadata=_help("continue from the latest checkpoint in --output_dir"))
    resume_ignore_changes: bool = field(default=False, metadata=_help(
        "--resume even where this run's settings (teacher weights, batch size, data, ...) differ from the "
        "checkpoint's"))
    skip_nonfinite_steps: int = field(default=0, metadata=_help(
        "tolerate up to N training steps with a NaN/inf loss by skipping their update (fp16 overflow); "
        "0: stop at the first"))
    cost_runs: int = field(default=20, metadata=_help(
        "at the end of a run, time the student and the teacher on the CPU this many times per batch size (the "
        "median goes to student/cost.json and the model card, with parameters and GMACs); 0: skip"))
    export_onnx: bool = field(default=False, metadata=_help(
        "at the end of a run, also write student/model.onnx, checked against PyTorch on the evaluation split"))
    export_int8: bool = field(default=False, metadata=_help(
        "with --export-onnx: also student/model_int8.onnx (ONNX Runtime static quantisation)"))

    def __post_init__(self):
        check_count(self.cost_runs, "cost_runs", at_least=0)
        require(self.export_onnx or not self.export_int8, "export_int8", "needs --export-onnx", self.export_int8)
        check_count(self.skip_nonfinite_steps, "skip_nonfinite_steps", at_least=0)
        name = self.opt.lower().removeprefix("lookahead_")
        if name not in list_optimizers():
            raise UsageError(f"unknown optimizer --opt {self.opt!r}; e.g. sgd, adamw, lamb "
                             f"(all names: timm.optim.list_optimizers())")
        if self.sched not in SCHEDULERS:
            raise UsageError(f"unknown scheduler --sched {self.sched!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.model_ema and not self.model_ema_decay:
            raise UsageError("--model-ema needs at least one --model-ema-decay value")
        if self.export_ema and not self.model_ema:
            raise UsageError("--export-ema needs --model-ema")
        check_probability(self.momentum, "momentum", one_excluded=True)
        check_range(self.opt_eps, "opt_eps", low=0.0, low_open=True)
        require(not self.opt_betas or (len(self.opt_betas) == 2 and all(0 <= b < 1 for b in self.opt_betas)),
                "opt_betas", "takes two values BETA1 BETA2, each in [0, 1)", self.opt_betas)
        for name in ("warmup_epochs", "cooldown_epochs"):
            check_count(getattr(self, name), name, at_least=0)
        for name in ("warmup_lr", "min_lr"):
            check_range(getattr(self, name), name, low=0.0)
        for name in ("decay_epochs", "decay_rate"):
            check_range(getattr(self, name), name, low=0.0, low_open=True)
        require(all(0 <= d < 1 for d in self.model_ema_decay), "model_ema_decay", "takes values in [0, 1)",
                self.model_ema_decay)


AUTO_WORKERS = -1
MAX_AUTO_WORKERS = 8


def auto_num_workers(on_gpu: bool = True) -> int:
    """Data workers per process. With a GPU: the CPU cores this process may use, shared by the training
    processes of this machine, less one for the process itself, at most MAX_AUTO_WORKERS (more rarely pays off).
    Training on the CPU: none, as the training process's own threads already use every core (a worker would
    only take cores from it: README.md, Performance)."""
    if not on_gpu:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_AUTO_WORKERS, cores // local_processes - 1))


@dataclass
class DistillTrainingArguments(TrainingArguments):
    """TrainingArguments with the reference's names as aliases and its defaults."""

    output_dir: str | None = field(default="output/train", metadata=_help("where everything is written",
                                                                          "--output"))
    learning_rate: float = field(default=0.05, metadata=_help("peak learning rate", "--lr"))
    num_train_epochs: float = field(default=300, metadata=_help("training epochs", "--epochs"))
    per_device_train_batch_size: int = field(default=128, metadata=_help("batch size per device",
                                                                          "--batch-size", "-b"))
    weight_decay: float = field(default=2e-5, metadata=_help("weight decay"))
    max_grad_norm: float = field(default=0.0, metadata=_help("gradient clipping norm (0: none)", "--clip-grad"))
    seed: int = field(default=42, metadata=_help("random seed"))
    dataloader_num_workers: int = field(default=AUTO_WORKERS, metadata=_help(
        f"data loading worker processes per training process ({AUTO_WORKERS}: on a GPU, one per CPU core of each "
        f"local process's share, less one, at most {MAX_AUTO_WORKERS}; none when training on the CPU); an exactly "
        f"repeatable mid-epoch resume needs 0", "--workers", "-j"))
    dataloader_persistent_workers: bool | None = field(default=None, metadata=_help(
        "keep data workers alive between epochs and evaluations (default: yes when there are workers)"))
    logging_steps: float = field(default=50, metadata=_help("log every N steps", "--log-interval"))
    eval_strategy: str = field(default="epoch", metadata=_help("when to evaluate: no | steps | epoch"))
    save_strategy: str = field(default="epoch", metadata=_help("when to checkpoint: no | steps | epoch"))
    save_total_limit: int | None = field(default=2, metadata=_help("checkpoints kept", "--checkpoint-hist"))
    report_to: str = field(default="tensorboard", metadata=_help("tensorboard | none | wandb | ..."))
    # The reference keeps the best of the raw and EMA students over all evaluations (docs/REFERENCE.md,
    # Recipe); eval_max_top1 is the higher of the two at one evaluation, and its best checkpoint is spared by the
    # rotation.
    metric_for_best_model: str | None = field(default="max_top1", metadata=_help(
        "metric whose best checkpoint is kept (max_top1: the higher of raw and EMA top-1)"))
    remove_unused_columns: bool = field(default=False, metadata=_help("keep False: transforms need raw columns"))
    dataloader_drop_last: bool = field(default=True, metadata=_help("drop the last incomplete training batch"))
    push_to_hub: bool = field(default=False, metadata=_help("push OUTPUT_DIR/student (not checkpoints) to the Hub"))
    hub_create_pr: bool = field(default=False, metadata=_help("push the student as a pull request", "--hub-create-pr"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "replace the run already in --output_dir (its checkpoints, student and logs are deleted)"))
    # A NaN loss stops the run (pat_hf/training/nonfinite.py); transformers' filter would log it as an earlier mean and
    # read the loss on the host every step.
    logging_nan_inf_filter: bool = field(default=False, metadata=_help("keep False: non-finite losses stop the run"))
    # A process that dies leaves the others waiting in a collective: end them after this long, not 30 minutes.
    ddp_timeout: int = field(default=600, metadata=_help("seconds a process waits for the others (distributed)"))
    # Ours, in place of transformers' --debug (underflow/overflow and TPU debugging, which pat-hf does not use).
    # The command line's error handler reads it from argv (an error can come before parsing ends); here it is
    # handed back to transformers as "no debug options".
    debug: bool = field(default=False, metadata=_help("show the full traceback of an error"))
    # --push-to-hub publishes the exported student once training is done; the Trainer itself must not push
    # checkpoints, so its push_to_hub is turned off and the request kept here.
    push_student_to_hub: bool = field(default=False, init=False)

    def __post_init__(self):
        self.debug = ""
        # An empty --output_dir would be met only once the data and models are built (and "" is no folder).
        require(bool(self.output_dir and str(self.output_dir).strip()), "output_dir",
                "must name a folder (e.g. --output_dir runs/NAME)", self.output_dir, flag="--output_dir")
        check_range(self.per_device_train_batch_size, "per_device_train_batch_size", low=0, low_open=True,
                    flag="--batch-size")
        check_range(self.learning_rate, "learning_rate", low=0.0, low_open=True, flag="--lr")
        if not self.max_steps or self.max_steps < 0:
            check_range(self.num_train_epochs, "num_train_epochs", low=0.0, low_open=True, flag="--epochs")
        check_range(self.weight_decay, "weight_decay", low=0.0, flag="--weight-decay")
        check_range(self.max_grad_norm, "max_grad_norm", low=0.0, flag="--clip-grad")
        check_count(self.gradient_accumulation_steps, "gradient_accumulation_steps",
                    flag="--gradient_accumulation_steps")
        self.push_student_to_hub = self.push_to_hub
        self.push_to_hub = False
        if self.label_names is None:
            self.label_names = ["labels"]
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Several processes and no GPU: without use_cpu accelerate falls back to one non-distributed
                # process each; with it, they form a real gloo DDP group.
                self.use_cpu = True
        if self.dataloader_num_workers == AUTO_WORKERS:
            self.dataloader_num_workers = auto_num_workers(on_gpu=torch.cuda.is_available() and not self.use_cpu)
        if self.dataloader_persistent_workers is None:
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        check_range(self.ddp_timeout, "ddp_timeout", low=0, low_open=True, flag="--ddp_timeout")
        super().__post_init__()

    @property
    def subset_seed(self) -> int:
        """The seed of the data subsets (--max-*-samples, --label-fraction): --data_seed, else --seed."""
        return self.seed if self.data_seed is None else self.data_seed

    @classmethod
    def subset_seed_of(cls, training: dict[str, Any]) -> int:
        """`subset_seed` of a finished run, from the training arguments its run_config.json keeps."""
        data_seed = training.get("data_seed")
        return training.get("seed", cls.seed) if data_seed is None else data_seed


# Settings that a resumed run may change: they do not change what the student learns.
_DATA_NOT_IN_IDENTITY = {"validation_batch_size", "strict_images"}  # how faults are met, not what is trained
_RECIPE_NOT_IN_IDENTITY = {"resume", "resume_ignore_changes", "skip_nonfinite_steps", "model_ema", "model_ema_decay",
                           "export_ema", "channels_last", "cost_runs", "export_onnx", "export_int8"}


@dataclass
class RunArguments:
    model: ModelArguments
    data: DataArguments
    recipe: RecipeArguments
    distill: DistillArguments
    hparams: Any
    training: DistillTrainingArguments

    def run_identity(self, teacher_weights: str | None = None) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (pat_hf/training/checkpoints.py): the models and
        the distiller, and every setting that changes what is trained, by its YAML key. `teacher_weights` names the
        teacher's weights by content (the sha256 of its file). The run's length, its logging, saving and
        evaluation schedule, and how it is run (workers, memory format, EMA copies) may change."""
        m, t = self.model, self.training
        own = dataclasses.asdict(self.hparams) if self.hparams is not None else {}
        identity = {
            "model": m.model, "model_kwargs": m.model_kwargs, "teacher": m.teacher, "teacher_kwargs": m.teacher_kwargs,
            "distiller": self.distill.distiller,
            "teacher_weights": teacher_weights or m.teacher_pretrained or None, "use_ema_teacher": m.use_ema_teacher,
            "num_classes": m.num_classes, "img_size": m.img_size, "drop": m.drop, "drop_path": m.drop_path,
            **{k: v for k, v in dataclasses.asdict(self.data).items() if k not in _DATA_NOT_IN_IDENTITY},
            **{k: v for k, v in dataclasses.asdict(self.recipe).items() if k not in _RECIPE_NOT_IN_IDENTITY},
            **dataclasses.asdict(self.distill), **own,
            "batch_size": t.per_device_train_batch_size, "processes": t.world_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "lr": t.learning_rate,
            "weight_decay": t.weight_decay, "clip_grad": t.max_grad_norm, "seed": t.seed, "data_seed": t.data_seed,
            "drop_last": t.dataloader_drop_last,
        }
        return json.loads(json.dumps(identity))  # as the checkpoint's marker stores it (tuples become lists)

    def distiller_hyperparameters(self) -> dict[str, Any]:
        shared = dataclasses.asdict(self.distill)
        own = dataclasses.asdict(self.hparams) if self.hparams is not None else {}
        return {**shared, **own}

    def recipe_summary(self) -> dict[str, Any]:
        t = self.training
        return {"epochs": t.num_train_epochs, "batch_size": t.per_device_train_batch_size, "lr": t.learning_rate,
                "weight_decay": t.weight_decay, "clip_grad": t.max_grad_norm or None, "seed": t.seed,
                **dataclasses.asdict(self.recipe)}

    def as_dict(self) -> dict[str, Any]:
        """Every resolved value, YAML-serialisable (written to OUTPUT_DIR/args.yaml as the reference does)."""
        sections = {"model": self.model, "data": self.data, "recipe": self.recipe, "distill": self.distill}
        resolved = {name: dataclasses.asdict(section) for name, section in sections.items()}
        resolved["distiller_hyperparameters"] = dataclasses.asdict(self.hparams) if self.hparams else {}
        resolved["training"] = json.loads(self.training.to_json_string())
        return resolved
