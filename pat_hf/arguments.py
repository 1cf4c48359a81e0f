"""Command-line and YAML arguments: dataclasses parsed by `HfArgumentParser` with `TrainingArguments`.

The reference's flag names work (`--batch-size`, `--lr`, `--epochs`, `--clip-grad`, ...) next to HF's own
(`--output_dir`, `--logging_steps`, ...). `--config FILE.yaml` supplies defaults that flags override, and its
keys are the reference's (`batch_size`, `lr`, `weight_decay`, ...) or ours; an unknown key is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import list_optimizers
from transformers import HfArgumentParser, TrainingArguments

from pat_hf.distillers import DISTILLERS, DistillArguments, Distiller, get_distiller_class
from pat_hf.overridden_flags import reject_overridden_flags
from pat_hf.schedule import SCHEDULERS

BASE_KEY = "base"
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


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
        self.model_kwargs = _json_dict(self.model_kwargs, "--model-kwargs")
        self.teacher_kwargs = _json_dict(self.teacher_kwargs, "--teacher-kwargs")


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

    def __post_init__(self):
        if self.streaming and self.aug_repeats:
            raise ValueError("--aug-repeats repeats indices of a map-style dataset; drop it or --streaming")
        if self.samples_per_epoch is not None and not self.streaming:
            raise ValueError("--samples-per-epoch is for --streaming runs; use --max-train-samples for a subset")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle-buffer-size must be at least 1, got {self.shuffle_buffer_size}")


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

    def __post_init__(self):
        if self.skip_nonfinite_steps < 0:
            raise ValueError(f"--skip-nonfinite-steps must be 0 or more, got {self.skip_nonfinite_steps}")
        name = self.opt.lower().removeprefix("lookahead_")
        if name not in list_optimizers():
            raise ValueError(f"unknown optimizer --opt {self.opt!r}; e.g. sgd, adamw, lamb "
                             f"(all names: timm.optim.list_optimizers())")
        if self.sched not in SCHEDULERS:
            raise ValueError(f"unknown scheduler --sched {self.sched!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.model_ema and not self.model_ema_decay:
            raise ValueError("--model-ema needs at least one --model-ema-decay value")
        if self.export_ema and not self.model_ema:
            raise ValueError("--export-ema needs --model-ema")


AUTO_WORKERS = -1
MAX_AUTO_WORKERS = 8


def auto_num_workers(on_gpu: bool = True) -> int:
    """Data workers per process. With a GPU: the CPU cores this process may use, shared by the training
    processes of this machine, less one for the process itself, at most MAX_AUTO_WORKERS (more rarely pays off).
    Training on the CPU: none, as the training process's own threads already use every core (a worker would
    only take cores from it; measured on 2 cores, tiny runs take half as long again with one)."""
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
    # A NaN loss stops the run (pat_hf/nonfinite.py); transformers' filter would log it as an earlier mean and
    # read the loss on the host every step.
    logging_nan_inf_filter: bool = field(default=False, metadata=_help("keep False: non-finite losses stop the run"))
    # A process that dies leaves the others waiting in a collective: end them after this long, not 30 minutes.
    ddp_timeout: int = field(default=600, metadata=_help("seconds a process waits for the others (distributed)"))
    # Ours, in place of transformers' --debug (underflow/overflow and TPU debugging, which pat-hf does not use).
    debug: bool = field(default=False, metadata=_help("show the full traceback of an error"))

    def __post_init__(self):
        self.show_traceback = bool(self.debug)
        self.debug = ""
        _check_positive("--batch-size", self.per_device_train_batch_size)
        _check_positive("--lr", self.learning_rate)
        if not self.max_steps or self.max_steps < 0:
            _check_positive("--epochs", self.num_train_epochs)
        # Our --push-to-hub publishes the exported student; the Trainer must not push training checkpoints.
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
        _check_positive("--ddp_timeout", self.ddp_timeout)
        if self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _start_cpu_process_group(self.ddp_timeout)
        super().__post_init__()


def _start_cpu_process_group(timeout_seconds: int) -> None:
    """transformers hands --ddp_timeout to the process group on GPUs only: start the CPU (gloo) group here with
    it, before accelerate would start it with torch's default of 30 minutes."""
    if torch.distributed.is_available() and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_seconds))


# Settings that a resumed run may change: they do not change what the student learns.
_DATA_NOT_IN_IDENTITY = {"validation_batch_size", "strict_images"}  # how faults are met, not what is trained
_RECIPE_NOT_IN_IDENTITY = {"resume", "resume_ignore_changes", "skip_nonfinite_steps", "model_ema", "model_ema_decay",
                           "export_ema", "channels_last"}


@dataclass
class RunArguments:
    model: ModelArguments
    data: DataArguments
    recipe: RecipeArguments
    distill: DistillArguments
    hparams: Any
    training: DistillTrainingArguments

    def run_identity(self, teacher_weights: str | None = None) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (pat_hf/checkpoints.py): the models and the
        distiller, and every setting that changes what is trained, by its YAML key. `teacher_weights` names the
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


def _check_positive(flag: str, value: float) -> None:
    if not value > 0:  # NaN too
        raise ValueError(f"{flag} must be positive, got {value}")


def _json_dict(value: Any, flag: str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"img_size\": 32}}': {error}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{flag} must be a JSON object, got {value!r}")
    return parsed


def _dataclass_types(distiller_cls: type[Distiller]) -> list[type]:
    """The sections a run of `distiller_cls` parses: the shared ones and that distiller's own hyper-parameters."""
    own = [distiller_cls.Arguments] if distiller_cls.Arguments is not None else []
    return [ModelArguments, DataArguments, RecipeArguments, DistillArguments, *own, DistillTrainingArguments]


def _key_names(f: dataclasses.Field) -> list[str]:
    """The names a YAML key may use for a field: its name and its `--` aliases, in underscores."""
    return [f.name, *(alias[2:].replace("-", "_") for alias in f.metadata.get("aliases", [])
                      if alias.startswith("--"))]


def _key_to_dest(types: list[type]) -> dict[str, str]:
    """Every name a YAML key may use (field names, dashed names, aliases) -> the field it sets."""
    return {name: f.name for dataclass_type in types for f in dataclasses.fields(dataclass_type) if f.init
            for name in _key_names(f)}


def _owners_of_other_options(distiller_cls: type[Distiller]) -> dict[str, str]:
    """Option names (YAML keys in underscores, flags as typed) of the other distillers -> the distiller's name."""
    owners = {}
    for name, cls in DISTILLERS.items():
        if cls.Arguments is None or cls.Arguments is distiller_cls.Arguments:
            continue
        for f in dataclasses.fields(cls.Arguments):
            for key in _key_names(f):
                owners |= {key: name, f"--{key}": name, f"--{key.replace('_', '-')}": name,
                           f"--no_{key}": name, f"--no-{key.replace('_', '-')}": name}
    return owners


def _belongs_elsewhere(option: str, owner: str, distiller: str) -> str:
    return f"{option} belongs to --distiller {owner}, not {distiller}"


def packaged_config_names() -> list[str]:
    return sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for p in PACKAGED_CONFIGS.rglob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML file, or the name of a config shipped inside the package (`cifar/cnn`, `smoke`,
    `configs/cifar/cnn.yaml`), so that a pip-installed pat-hf finds its recipes from any directory."""
    if Path(path).is_file():
        return Path(path)
    name = path.removeprefix("configs/")
    packaged = PACKAGED_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config not found: {path} is neither a file nor a shipped config "
                            f"(e.g. {', '.join(packaged_config_names()[:4])}; see pat_hf/configs)")


def _config_chain(path: str, _included_from: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(file, its keys) of a YAML file and the files it extends through `base: OTHER.yaml` (relative to the
    file; bases may chain), the farthest base first."""
    config_path = resolve_config_path(path) if not _included_from else Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    base = config.pop(BASE_KEY, None)
    if base is None:
        return [(path, config)]
    chain = (*_included_from, config_path.resolve())
    base_path = (config_path.parent / str(base)).resolve()
    if base_path in chain:
        raise ValueError(f"{path}: 'base: {base}' includes a file that includes it")
    return [*_config_chain(str(base_path), chain), (path, config)]


def read_config(path: str, types: list[type], distiller: str = "") -> dict[str, tuple[str, Any]]:
    """The defaults a YAML file sets, by field name, as (key as written, value), its own keys overriding its
    bases'. `distiller`: the run's, to name the distiller a key of another one belongs to."""
    destinations = _key_to_dest(types)
    others = _owners_of_other_options(get_distiller_class(distiller)) if distiller else {}
    defaults = {}
    for file, config in _config_chain(path):
        for key, value in config.items():
            normalised = str(key).replace("-", "_")
            if normalised in others:
                raise ValueError(_belongs_elsewhere(f"key {key!r} in {file}", others[normalised], distiller))
            if normalised not in destinations:
                raise ValueError(f"unknown key {key!r} in {file}; run with --help for the accepted names")
            defaults[destinations[normalised]] = (str(key), value)
    return defaults


def _typed_value(action: argparse.Action, value: Any) -> Any:
    """`value` converted by the option's type as argparse converts a typed flag; TypeError/ValueError if it
    cannot be."""
    if value is None or action.type is None:
        return value
    if action.type is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise ValueError(value)
    converted = action.type(value if isinstance(value, str) else str(value) if action.type is str else value)
    if action.choices is not None and converted not in action.choices:
        raise ValueError(value)
    return converted


def _typed_config_values(parser: HfArgumentParser, defaults: dict[str, tuple[str, Any]],
                         config_path: str) -> dict[str, Any]:
    """The YAML values with the types of their options: a value of the wrong type is an error naming its key,
    before anything is built."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for dest, (key, value) in defaults.items():
        action = actions[dest]
        takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        expected = {"string_to_bool": "true or false"}.get(getattr(action.type, "__name__", ""),
                                                            getattr(action.type, "__name__", "a value"))
        try:
            if takes_list:
                typed[dest] = [_typed_value(action, v) for v in (value if isinstance(value, list) else [value])]
            elif isinstance(value, dict) and action.type is str:
                typed[dest] = value  # a JSON-object option (--model-kwargs) given as a YAML mapping
            elif isinstance(value, list | dict):
                raise ValueError(value)
            else:
                typed[dest] = _typed_value(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            what = f"a list of {expected}" if takes_list else expected
            choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
            raise ValueError(f"{config_path}: {key} takes {what}{choices}, got {value!r}") from None
    return typed


def _distiller_name(argv: list[str]) -> str:
    """The run's distiller, from --distiller or else --config, before anything else is parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config", default="")
    parser.add_argument("--distiller", default=None)
    known = parser.parse_known_args(argv)[0]
    if known.distiller is not None:
        return known.distiller
    from_config = [config["distiller"] for _, config in _config_chain(known.config) if "distiller" in config] \
        if known.config else []
    return from_config[-1] if from_config else DistillArguments.distiller


def _set_mixed_precision(values: dict[str, Any]) -> None:
    """--amp: fp16 (or --amp-dtype bfloat16) autocast on CUDA, bf16 autocast on the CPU."""
    if values["amp_dtype"] not in ("float16", "bfloat16"):
        raise ValueError(f"--amp-dtype must be float16 or bfloat16, got {values['amp_dtype']!r}")
    on_cuda = torch.cuda.is_available() and not values["use_cpu"]
    use_fp16 = on_cuda and values["amp_dtype"] == "float16"
    values["fp16"], values["bf16"] = use_fp16, not use_fp16
    if not on_cuda:
        # TrainingArguments accepts bf16 without a GPU only when told to run on the CPU.
        values["use_cpu"] = True


class _OneLineErrorParser(HfArgumentParser):
    """argparse's errors as one line on stderr (no usage block), exit status 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _build_parser(types: list[type]) -> HfArgumentParser:
    parser = _OneLineErrorParser(types, prog="pat-hf-train", epilog="Each distiller has options of its own: add "
                                                                   "--distiller NAME to --help to list them.")
    parser.add_argument("-c", "--config", default="", help="YAML file of default values (reference keys)")
    parser._option_string_actions["--distiller"].help = f"distillation method: {' | '.join(DISTILLERS)}"
    return parser


def parse_arguments(argv: list[str] | None = None) -> RunArguments:
    """Parse flags over YAML defaults over built-in defaults, as the reference's train.py does. The distiller
    is found first: only its own hyper-parameters are accepted, and they are checked as they are parsed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    reject_overridden_flags(argv)
    distiller = _distiller_name(argv)
    distiller_cls = get_distiller_class(distiller)
    types = _dataclass_types(distiller_cls)
    parser = _build_parser(types)
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        defaults = read_config(config_path, types, distiller)
        if defaults.get("max_grad_norm", ("", 0))[1] is None:
            defaults["max_grad_norm"] = (defaults["max_grad_norm"][0], 0.0)
        parser.set_defaults(**_typed_config_values(parser, defaults, config_path))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        others = _owners_of_other_options(distiller_cls)
        for option in (arg.split("=", 1)[0] for arg in unknown):
            if option in others:
                parser.error(_belongs_elsewhere(option, others[option], distiller))
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    if values["amp"]:
        _set_mixed_precision(values)
    instances = [t(**{f.name: values[f.name] for f in dataclasses.fields(t) if f.init}) for t in types]
    model, data, recipe, distill, *own, training = instances
    return RunArguments(model, data, recipe, distill, own[0] if own else None, training)
