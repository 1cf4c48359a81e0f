"""Saves that survive anything: SIGKILL at random moments of checkpoint writes, and a full disk mid-save.

Every kill leaves the previous complete checkpoint usable, and --resume (or --overwrite_output_dir when the kill
came before the first checkpoint) finishes the run with exactly the student of an uninterrupted run. The runs are
processes forked from a server that imported pat-hf once (tests/child_runs.py), so a restart costs no imports."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pat_hf.cli import failures
from pat_hf.cli import train as pat_train
from pat_hf.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointWriteError,
    checkpoint_folders,
    latest_complete_checkpoint,
)
from tests.child_runs import finish_child, start_child
from tests.helpers import save_teacher, tiny_run
from tests.test_recipe_resume import assert_same_tensors, pat_run_args

STEPS_PER_EPOCH = 6  # pat_run_args: 48 samples, batch 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return Path(save_teacher(tmp_path_factory.mktemp("teacher"), "test_convnext"))


def kill_run(argv: list[str], output: Path, epochs: int) -> list[str]:
    return [*argv, "--epochs", str(epochs), "--save_steps", "1", "--save_total_limit", "2"]


def saving(output: Path) -> bool:
    """Whether a checkpoint or the export is being written."""
    return output.is_dir() and any(entry.name.endswith(".partial") and entry.name.startswith(("checkpoint-",
                                                                                              "student"))
                                   for entry in os.scandir(output))


def wait_for(condition, process, what: str, log: Path) -> None:
    while not condition():
        assert process.is_alive(), f"the run ended before {what}: {log.read_text()[-2000:]}"
        time.sleep(0.0005)


def run_with_kills(argv: list[str], output: Path, kills: int, seed: int, logs: Path) -> list[str]:
    """Run `argv` and SIGKILL it `kills` times, each time a random moment (0-250 ms) after the start of its
    first, second or third checkpoint save (a save takes 50-250 ms here, so some kills land in the next
    training step), restarting it after each kill; the last start finishes. Returns the newest complete
    checkpoint after each kill, marked where the kill came in the middle of a save."""
    rng = random.Random(seed)
    landed = []
    for attempt in range(kills + 1):
        if latest_complete_checkpoint(output) is not None:
            extra = ["--resume"]
        else:  # killed before its first checkpoint was complete: start afresh
            extra = ["--overwrite_output_dir"] if output.exists() else []
        log = logs / f"start{attempt}.log"
        process = start_child([*argv, *extra], log)
        if attempt == kills:
            finish_child(process, log)
            return landed
        for _ in range(rng.randint(0, 2)):  # let a save or two pass
            wait_for(lambda: saving(output), process, f"kill {attempt + 1}", log)
            wait_for(lambda: not saving(output), process, f"kill {attempt + 1}", log)
        wait_for(lambda: saving(output), process, f"kill {attempt + 1}", log)
        time.sleep(rng.uniform(0.0, 0.25))
        mid_save = saving(output)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.join()
        newest = latest_complete_checkpoint(output)
        landed.append(f"{newest.name if newest else 'none'}{' (mid-save)' if mid_save else ''}")
    return landed


def check_kills(tmp_path: Path, teacher: Path, kills: int, epochs: int) -> list[str]:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    logs = tmp_path / "logs"
    logs.mkdir()
    finish_child(start_child(kill_run(pat_run_args(teacher, straight), straight, epochs), logs / "straight.log"),
                 logs / "straight.log")
    landed = run_with_kills(kill_run(pat_run_args(teacher, killed), killed, epochs), killed, kills, seed=kills,
                            logs=logs)
    assert len(landed) == kills
    final = f"checkpoint-{epochs * STEPS_PER_EPOCH}"
    for name in ("model.safetensors", "ema.safetensors", "distiller_state_rank0.safetensors"):
        assert_same_tensors(straight / final / name, killed / final / name)
    assert_same_tensors(straight / "student" / "model.safetensors", killed / "student" / "model.safetensors")
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".partial")]
    assert all((folder / COMPLETE_MARKER).is_file() for folder in checkpoint_folders(killed))
    print(f"\n{kills} kills landed after: {', '.join(landed)}")
    return landed


def test_kills_during_saves_resume_to_the_same_student(tmp_path, teacher):
    check_kills(tmp_path, teacher, kills=3, epochs=2)


@pytest.mark.benchmark
def test_twenty_kills_during_saves_resume_to_the_same_student(tmp_path, teacher):
    landed = check_kills(tmp_path, teacher, kills=20, epochs=8)
    assert len({where.split()[0] for where in landed}) >= 8, "the kills should land all along the run"
    assert sum("mid-save" in where for where in landed) >= 8, "most kills should come in the middle of a save"


def fail_when_writing(monkeypatch, module, name: str, folder: str) -> None:
    """`module.name` (a writer) fails as on a full disk when it writes into `folder`."""
    real = getattr(module, name)

    def write(obj, path, *args, **kwargs):
        if folder in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, write)


def student_run(output: Path, *extra: str) -> list[str]:
    return tiny_run(output, None, "--distiller", "vanilla", "--max-train-samples", "64", "--batch-size", "8",
                    "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "10", "--logging_steps",
                    "4", "--eval_strategy", "no", *extra)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors.save_file"])
def test_a_full_disk_mid_save_stops_in_one_line_and_the_run_resumes(tmp_path, monkeypatch, writer):
    straight, full = tmp_path / "straight", tmp_path / "full"
    pat_train.main(student_run(straight))
    with monkeypatch.context() as patch:
        module, name = (torch, "save") if writer == "torch.save" else (safetensors.torch, "save_file")
        fail_when_writing(patch, module, name, "checkpoint-4")
        with pytest.raises(CheckpointWriteError) as error:
            pat_train.main(student_run(full))
    line = failures.error_line(error.value)
    assert line == (f"could not write {full / 'checkpoint-4'}: No space left on device; nothing of it was kept and "
                    f"the earlier checkpoints are intact: free space (or restore write access) and continue with "
                    f"--resume")
    assert sorted(p.name for p in full.iterdir()) == ["args.yaml", "checkpoint-2"]
    assert (full / "checkpoint-2" / COMPLETE_MARKER).is_file()

    pat_train.main([*student_run(full), "--resume"])
    assert_same_tensors(straight / "student" / "model.safetensors", full / "student" / "model.safetensors")


def test_a_full_disk_during_the_export_leaves_no_half_written_student(tmp_path, monkeypatch):
    output = tmp_path / "run"
    fail_when_writing(monkeypatch, safetensors.torch, "save_file", "student.partial")
    with pytest.raises(OSError) as error:
        pat_train.main(student_run(output))
    assert failures.error_line(error.value) == (
        f"could not write the student to {output / 'student'}: No space left on device; nothing of it was kept and "
        f"the checkpoints are intact: free space (or restore write access) and export it with --resume")
    assert not (output / "student").exists() and not list(output.glob("*.partial"))
    assert (latest_complete_checkpoint(output) / COMPLETE_MARKER).is_file()
    monkeypatch.undo()
    pat_train.main([*student_run(output), "--resume"])
    assert (output / "student" / "model.safetensors").is_file()
