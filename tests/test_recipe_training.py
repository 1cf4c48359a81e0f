"""The training recipe end to end on tiny models: schedule, optimizer, EMA, logging, mixed precision, evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file, save_file
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import Lamb
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from torch.utils.data import BatchSampler
from transformers import TrainerCallback, TrainingArguments

from pat_hf.cli import evaluate as evaluate_cli
from pat_hf.cli import train as pat_train
from pat_hf.config.arguments import RecipeArguments
from pat_hf.data.samplers import InterleavedRepeatAugSampler
from pat_hf.distillers import DistillArguments, DistillContext, get_distiller_class
from pat_hf.distillers.pat import PATArguments
from pat_hf.training.trainer import DistillationTrainer

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--img-size", "32", "--batch-size", "8", "--report_to", "none", "--disable_tqdm", "true", "--workers", "0"]
STUDENT_ONLY = ["--model", "test_resnet", "--teacher", "", "--distiller", "vanilla", "--num-classes", "10"]


class RecordLearningRates(TrainerCallback):
    """The rate of every parameter group as each optimizer step applies it."""

    def __init__(self):
        self.rates: list[list[float]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append([group["lr"] for group in optimizer.param_groups])


def timm_rates(scheduler_cls, steps: int, updates_per_epoch: int, per_update: bool = False, **kwargs) -> list[float]:
    """What timm's scheduler, stepped as the reference steps it, sets at each optimizer step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=kwargs.pop("lr"))
    scheduler = scheduler_cls(optimizer, t_in_epochs=not per_update, **kwargs)
    rates = []
    for step in range(steps):
        if per_update:
            scheduler.step_update(step)
        else:
            scheduler.step(step // updates_per_epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


SCHEDULE_CASES = {
    # docs/REFERENCE.md, Recipe: cifar/cnn.yaml, cosine from 0.05 to 1e-3 with linear warmup from 1e-4, per epoch.
    "cifar-cnn-cosine": (["--config", str(CONFIGS / "cifar/cnn.yaml"), "--epochs", "5", "--warmup-epochs", "2"], 5,
                         lambda: timm_rates(CosineLRScheduler, 20, 4, lr=0.05, t_initial=5, lr_min=1e-3, warmup_t=2,
                                            warmup_lr_init=1e-4)),
    # imagenet/cnn.yaml's step schedule, decaying every 2 epochs here.
    "imagenet-cnn-step": (["--config", str(CONFIGS / "imagenet/cnn.yaml"), "--epochs", "5", "--warmup-epochs", "1",
                           "--decay-epochs", "2"], 5,
                          lambda: timm_rates(StepLRScheduler, 20, 4, lr=0.1, decay_t=2, decay_rate=0.1, warmup_t=1,
                                             warmup_lr_init=1e-4, warmup_prefix=False)),
    # Per update, and a cooldown epoch at min_lr that is trained too.
    "cosine-per-update-cooldown": (["--epochs", "3", "--warmup-epochs", "1", "--lr", "0.05", "--min-lr", "1e-3",
                                    "--sched-on-updates", "--cooldown-epochs", "1"], 4,
                                   lambda: timm_rates(CosineLRScheduler, 16, 4, per_update=True, lr=0.05, t_initial=12,
                                                      lr_min=1e-3, warmup_t=4, warmup_lr_init=1e-4)),
}


@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_learning_rate_is_timms_value_at_every_step(tmp_path, case):
    flags, epochs, expected = SCHEDULE_CASES[case]
    recorder = RecordLearningRates()
    pat_train.main([*flags, *STUDENT_ONLY, *TINY, "--max_train_samples", "32", "--eval_strategy", "no",
                      "--save_strategy", "no", "--output_dir", str(tmp_path)], callbacks=[recorder])
    expected = expected()
    assert len(recorder.rates) == epochs * 4 == len(expected)
    for step, (groups, rate) in enumerate(zip(recorder.rates, expected)):
        assert all(abs(lr - rate) <= 1e-9 for lr in groups), (step, groups, rate)
    print(f"\n{case}: " + " ".join(f"{groups[0]:.6g}" for groups in recorder.rates[::4]))


def tiny_pat(teacher_file: Path | None = None):
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4)
    teacher = timm.create_model("test_convnext", num_classes=10).requires_grad_(False)
    context = DistillContext(input_size=(3, 32, 32), num_classes=10)
    return get_distiller_class("pat")(student, teacher, DistillArguments(distiller="pat"),
                                      PATArguments(pat_raa_dim=32, pat_raa_num_queries=16), context)


@pytest.mark.parametrize(("opt", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lamb", Lamb)])
def test_optimizer_covers_student_and_modules_with_the_reference_decay_rule(tmp_path, opt, kind):
    distiller = tiny_pat()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, weight_decay=0.05)
    trainer = DistillationTrainer(model=distiller, args=args, recipe=RecipeArguments(opt=opt))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, kind)
    if opt == "sgd":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    names = {id(p): n for n, p in distiller.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {n for n, p in distiller.named_parameters() if p.requires_grad}
    assert decayed | exempt == trainable and not decayed & exempt
    assert not [n for n in trainable if n.startswith("teacher.")]
    assert any(n.startswith("region_attention.") for n in trainable)
    shapes = dict(distiller.named_parameters())
    assert exempt == {n for n in trainable if shapes[n].ndim <= 1 or n.endswith(".bias")}
    # Like the reference, the student's own no_weight_decay() (ViT pos_embed, cls_token) is not honoured.
    assert {"student.pos_embed", "student.cls_token"} <= decayed


class RecordForward(TrainerCallback):
    """Autocast state and memory formats seen by the student inside the distiller's training forward."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(student, inputs):
            self.seen.append({"autocast": torch.is_autocast_enabled("cpu"),
                              "dtype": torch.get_autocast_dtype("cpu"),
                              "input_channels_last": inputs[0].is_contiguous(memory_format=torch.channels_last),
                              "weights_channels_last": all(p.is_contiguous(memory_format=torch.channels_last)
                                                           for p in student.parameters() if p.ndim == 4)})
        model.student.register_forward_pre_hook(hook)


def test_amp_is_bf16_autocast_on_cpu_and_channels_last_reaches_the_forward(tmp_path):
    recorder = RecordForward()
    pat_train.main([*STUDENT_ONLY, *TINY, "--amp", "--channels-last", "--max_steps", "2", "--eval_strategy", "no",
                      "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(tmp_path)],
                     callbacks=[recorder])
    training = recorder.seen[:2]
    assert training and all(s["autocast"] and s["dtype"] == torch.bfloat16 for s in training)
    assert all(s["input_channels_last"] and s["weights_channels_last"] for s in training)
    # Channels-last weights still save (checkpoint and export hold contiguous tensors).
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    assert (tmp_path / "student" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Two epochs of KD into a ViT with two EMAs, TensorBoard on (the default), exporting the first EMA."""
    root = tmp_path_factory.mktemp("ema_run")
    torch.manual_seed(0)
    save_file(timm.create_model("test_convnext", num_classes=10).state_dict(), str(root / "teacher.safetensors"))
    output_dir = root / "run"
    metrics = pat_train.main([
        "--model", "test_vit", "--model_kwargs", '{"img_size": 32, "patch_size": 4}', "--teacher", "test_convnext",
        "--teacher-pretrained", str(root / "teacher.safetensors"), "--distiller", "kd", "--num-classes", "10",
        "--img-size", "32", "--batch-size", "8", "--max_train_samples", "32", "--max_eval_samples", "24",
        "--epochs", "2", "--warmup-epochs", "1", "--opt", "adamw", "--lr", "1e-3", "--model-ema",
        "--model-ema-decay", "0.5", "0.9", "--export-ema", "--checkpoint-hist", "1", "--logging_steps", "4",
        "--disable_tqdm", "true", "--workers", "0",
        "--output_dir", str(output_dir)])
    return output_dir, metrics


def test_ema_students_are_evaluated_and_the_best_is_over_raw_and_ema(ema_run):
    output_dir, metrics = ema_run
    top1 = [metrics["eval_top1"], metrics["eval_ema_top1"], metrics["eval_ema1_top1"]]
    assert metrics["eval_max_top1"] == max(top1)
    assert {"eval_top5", "eval_ema_top5", "eval_ema1_top5"} <= set(metrics)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    per_epoch = [log["eval_max_top1"] for log in state["log_history"] if "eval_max_top1" in log]
    assert len(per_epoch) == 2 and state["best_metric"] == max(per_epoch)
    assert [log["best_metric"] for log in state["log_history"] if "best_metric" in log][-1] == max(per_epoch)


def test_ema_weights_are_checkpointed_and_exported(ema_run):
    output_dir, _ = ema_run
    (checkpoint,) = output_dir.glob("checkpoint-*")  # --checkpoint-hist 1
    assert checkpoint.name == "checkpoint-8"
    ema = load_file(str(checkpoint / "ema.safetensors"))
    raw = {k.removeprefix("student."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    exported = load_file(str(output_dir / "student" / "model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in exported)  # --export-ema
    assert not all(torch.equal(ema[k], raw[k]) for k in ema)
    assert (checkpoint / "ema1.safetensors").is_file()


def test_summary_csv_has_one_row_per_epoch(ema_run):
    output_dir, metrics = ema_run
    with open(output_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["epoch"]) for r in rows] == [1.0, 2.0]
    assert {"lr", "train_loss", "loss_gt", "loss_kd", "eval_top1", "eval_top5", "eval_ema_top1", "eval_ema_top5",
            "eval_ema1_top1", "eval_max_top1"} <= set(rows[0])
    # Epoch 0 is warmup at warmup_lr; epoch 1 is the cosine's value at 1 of 2 epochs (timm's).
    assert float(rows[0]["lr"]) == pytest.approx(1e-4) and float(rows[1]["lr"]) == pytest.approx((1e-3 + 1e-6) / 2)
    for row in rows:
        assert float(row["train_loss"]) == pytest.approx(float(row["loss_gt"]) + float(row["loss_kd"]), rel=1e-5)
    assert float(rows[-1]["eval_ema_top1"]) == pytest.approx(metrics["eval_ema_top1"])


def test_tensorboard_logs_land_in_the_output_dir(ema_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = ema_run
    tags = set()
    for events in (output_dir / "runs").glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss_kd", "train/learning_rate", "eval/ema_top1", "eval/top1"} <= tags


def test_evaluate_cli_reproduces_the_run_metrics(ema_run, tmp_path):
    output_dir, metrics = ema_run
    exported = evaluate_cli.main([str(output_dir / "student"), "--json", str(tmp_path / "result.json")])
    assert exported["top1"] == pytest.approx(metrics["eval_ema_top1"])  # the exported student is the EMA
    assert json.loads((tmp_path / "result.json").read_text())["top5"] == pytest.approx(metrics["eval_ema_top5"])
    raw = evaluate_cli.main([str(output_dir / "checkpoint-8" / "model.safetensors")])
    assert (raw["top1"], raw["top5"]) == pytest.approx((metrics["eval_top1"], metrics["eval_top5"]))
    ema = evaluate_cli.main([str(output_dir / "checkpoint-8"), "--use-ema"])
    assert ema["top1"] == pytest.approx(metrics["eval_ema_top1"])


def test_repeated_augmentation_gives_each_process_the_reference_stream():
    dataset, batch_size, processes = list(range(40)), 4, 2
    sampler = InterleavedRepeatAugSampler(dataset, num_replicas=processes, batch_size=batch_size, num_repeats=3)
    sampler.set_epoch(1)
    for rank in range(processes):
        shard = BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=True), num_processes=processes,
                                  process_index=rank)
        reference = RepeatAugSampler(dataset, num_replicas=processes, rank=rank, num_repeats=3)
        reference.set_epoch(1)
        expected = list(reference)[: len(reference) // batch_size * batch_size]
        assert [i for batch in shard for i in batch] == expected
