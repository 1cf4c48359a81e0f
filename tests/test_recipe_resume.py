"""Checkpoints and --resume: an interrupted run continues exactly; bad resumes fail before writing anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from pat_hf.training.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, mark_complete, rotate_checkpoints

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# The child runs pat_train.main on one thread, like the test process, so both runs compute alike.
CHILD = "import sys, torch; torch.set_num_threads(1); from pat_hf import train; train.main(sys.argv[1:])"
STEPS_PER_EPOCH = 6  # 48 samples, batch 8
SAVE_STEPS = 4  # so the second checkpoint (step 8) falls in the middle of epoch 2
TOTAL_STEPS = 4 * STEPS_PER_EPOCH


def pat_run_args(teacher: Path, output_dir: Path) -> list[str]:
    """A tiny PAT pair on digits with augmentation, mixup and an EMA: every kind of state must survive (exactly:
    the data are drawn in the training process, --workers 0)."""
    return ["--model", "test_resnet", "--teacher", "test_convnext", "--teacher-pretrained", str(teacher),
            "--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16", "--num-classes", "10",
            "--img-size", "32", "--batch-size", "8", "--max_train_samples", "48", "--max_eval_samples", "16",
            "--epochs", "4", "--warmup-epochs", "1", "--opt", "adamw", "--lr", "1e-3", "--mixup", "0.8",
            "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.9", "--save_strategy", "steps",
            "--save_steps", str(SAVE_STEPS), "--save_total_limit", "2", "--report_to", "none",
            "--disable_tqdm", "true", "--workers", "0", "--output_dir", str(output_dir)]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "test_convnext.safetensors"
    save_file(timm.create_model("test_convnext", num_classes=10).state_dict(), str(path))
    return path


def assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{a.name}: {key} differs"


def test_killed_run_resumes_exactly(tmp_path, teacher):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    process = start(pat_run_args(teacher, straight), tmp_path / "straight.log")
    finish(process, tmp_path / "straight.log")

    log = tmp_path / "killed.log"
    process = start(pat_run_args(teacher, killed), log)
    second = killed / f"checkpoint-{2 * SAVE_STEPS}" / COMPLETE_MARKER
    while not second.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler, no cleanup
    process.wait()
    assert not (killed / "student").exists(), "the run finished before it was killed"

    # A save interrupted by the kill leaves a folder without the marker; --resume must pass it over.
    step = int(latest_complete_checkpoint(killed).name.split("-")[1])  # 8 (mid-epoch) unless killed late
    newest, interrupted = killed / f"checkpoint-{step}", killed / f"checkpoint-{step + 1}"
    shutil.copytree(newest, interrupted)
    (interrupted / COMPLETE_MARKER).unlink()
    (interrupted / "model.safetensors").write_bytes(b"truncated")

    log = tmp_path / "resumed.log"
    process = start([*pat_run_args(teacher, killed), "--resume", "--log_level", "info"], log)
    finish(process, log)
    assert f"from checkpoint with epoch {step // STEPS_PER_EPOCH} and global step {step}" in log.read_text()
    assert not interrupted.exists(), "rotation removes the interrupted save once newer checkpoints are complete"

    final = f"checkpoint-{TOTAL_STEPS}"
    for name in ("model.safetensors", "ema.safetensors", "distiller_state_rank0.safetensors"):
        assert_same_tensors(straight / final / name, killed / final / name)
    assert_same_tensors(straight / "student" / "model.safetensors", killed / "student" / "model.safetensors")

    # The frozen teacher comes from its own file: checkpoints hold the student and PAT's modules only.
    keys = load_file(str(killed / final / "model.safetensors")).keys()
    assert not [k for k in keys if k.startswith("teacher.")]
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("prompt_blocks.") for k in keys)


def fake_checkpoint(output_dir: Path, step: int, identity: dict | None) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if identity is not None:
        mark_complete(folder, {**identity, "global_step": step})
    return folder


IDENTITY = {"model": "test_resnet", "model_kwargs": {}, "teacher": "", "teacher_kwargs": {}, "distiller": "vanilla"}


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 4, IDENTITY)
    fake_checkpoint(tmp_path, 8, None)  # a save in progress or interrupted
    assert rotate_checkpoints(tmp_path, keep=1) == []
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"

    fake_checkpoint(tmp_path, 12, IDENTITY)
    deleted = rotate_checkpoints(tmp_path, keep=1, protected=str(tmp_path / "checkpoint-4"))
    assert [p.name for p in deleted] == ["checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-4"]


def resume_argv(output_dir: Path, *extra: str) -> list[str]:
    # Exact mid-epoch resumes need the data drawn in the training process (--workers 0).
    return ["--model", "test_resnet", "--teacher", "", "--distiller", "vanilla", "--report_to", "none",
            "--workers", "0", "--output_dir", str(output_dir), *extra]


def test_resume_without_checkpoint_fails_before_writing(tmp_path):
    from pat_hf.cli import train as pat_train

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pat_train.main(resume_argv(tmp_path / "run", "--resume"))
    assert not (tmp_path / "run").exists()

    fake_checkpoint(tmp_path / "run", 4, None)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pat_train.main(resume_argv(tmp_path / "run", "--resume"))
    with pytest.raises(ValueError, match="is incomplete"):
        pat_train.main(resume_argv(tmp_path / "run", "--resume_from_checkpoint", str(tmp_path / "run/checkpoint-4")))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        pat_train.main(resume_argv(tmp_path / "run"))


@pytest.mark.parametrize("change", [["--distiller", "kd", "--teacher", "test_resnet"], ["--model", "test_vit"]])
def test_resume_into_another_run_fails_before_writing(tmp_path, change):
    from pat_hf.cli import train as pat_train

    run = tmp_path / "run"
    fake_checkpoint(run, 4, IDENTITY)
    (run / "args.yaml").write_text(yaml.safe_dump({"model": IDENTITY}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="belongs to another run"):
        pat_train.main([*resume_argv(run, "--resume"), *change])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_at_an_epoch_end_that_was_followed_by_evaluation(tmp_path):
    """The checkpoint at step 4 is written before that epoch's evaluation: the resumed run does not evaluate
    there, yet must train exactly as the uninterrupted run (evaluation leaves the generators untouched)."""
    from pat_hf.cli import train as pat_train

    def argv(output_dir: Path) -> list[str]:
        return [*resume_argv(output_dir), "--img-size", "32", "--batch-size", "8", "--max_train_samples", "32",
                "--max_eval_samples", "16", "--num-classes", "10", "--epochs", "2", "--warmup-epochs", "1",
                "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "3", "--model-ema",
                "--disable_tqdm", "true"]

    pat_train.main(argv(tmp_path / "straight"))
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    pat_train.main([*argv(tmp_path / "resumed"), "--resume"])
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(tmp_path / "straight" / "checkpoint-8" / name, tmp_path / "resumed" / "checkpoint-8" / name)
    with open(tmp_path / "resumed" / "summary.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "2.0"]


class RecordRates(TrainerCallback):
    def __init__(self):
        self.rates: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_resuming_with_more_epochs_follows_a_fresh_run_of_that_length(tmp_path):
    """timm's scheduler state in the checkpoint holds the old length (t_initial): restoring it would run the
    added epochs at min_lr. The resumed run takes the rates a fresh 4-epoch run takes."""
    from pat_hf.cli import train as pat_train

    def argv(output_dir: Path, epochs: int) -> list[str]:
        return [*resume_argv(output_dir), "--img-size", "32", "--batch-size", "8", "--max_train_samples", "32",
                "--max_eval_samples", "16", "--num-classes", "10", "--epochs", str(epochs), "--warmup-epochs", "1",
                "--lr", "0.05", "--min-lr", "1e-3", "--eval_strategy", "no", "--save_strategy", "epoch",
                "--disable_tqdm", "true"]

    fresh, resumed = RecordRates(), RecordRates()
    pat_train.main(argv(tmp_path / "fresh", 4), callbacks=[fresh])
    pat_train.main(argv(tmp_path / "resumed", 2))
    pat_train.main([*argv(tmp_path / "resumed", 4), "--resume"], callbacks=[resumed])
    assert len(fresh.rates) == 16 and resumed.rates == fresh.rates[8:]
    assert min(resumed.rates) > 2e-3, "the added epochs ran at min_lr"
