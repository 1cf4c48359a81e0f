"""Failures around a run's files, each row a test through the console script's `cli()`: a checkpoint with a file
missing or damaged is refused (naming the file and the newest intact checkpoint) before anything is written; a
full disk during a save or the export is the promised line with its staging folder gone at once; a second run
into a held --output_dir is refused naming the holder, and the lock goes whenever a run ends."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from transformers import TrainerCallback

from pat_hf.cli import failures
from pat_hf.cli import train as pat_train
from pat_hf.training.checkpoints import COMPLETE_MARKER, FILES_KEY, latest_complete_checkpoint, verify_checkpoint
from pat_hf.training.output_lock import LOCK_FILE, OutputDirLock, OutputDirLockedError
from tests.helpers import save_teacher
from tests.test_failures import error_lines, pat_run, run_cli, snapshot, student_run

# ---- damaged or incomplete checkpoints ----


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished PAT run with an EMA and checkpoints at steps 2 and 4: every kind of file a resume reads
    (the distiller's per-process state, the EMA, the data-order RNG besides the Trainer's own)."""
    root = tmp_path_factory.mktemp("saved")
    teacher = save_teacher(root)
    argv = pat_run(root / "run", teacher, "--model-ema", "--save_strategy", "steps", "--save_steps", "2",
                   "--eval_strategy", "no")
    pat_train.main(argv)
    return root / "run", argv


def removed(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def truncated(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return damage


def overwritten(name: str) -> Callable[[Path], None]:
    """The file's bytes replaced by others of the same length (a size check alone cannot see it)."""
    def damage(folder: Path) -> None:
        size = (folder / name).stat().st_size
        (folder / name).write_bytes(bytes(range(256)) * (size // 256) + b"\0" * (size % 256))

    return damage


def unlisted(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """`damage` in a checkpoint whose marker lists no files (written by an older pat-hf)."""
    def both(folder: Path) -> None:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        del marker[FILES_KEY]
        (folder / COMPLETE_MARKER).write_text(json.dumps(marker))
        damage(folder)

    return both


@dataclass(frozen=True)
class Damage:
    damage: Callable[[Path], None]
    message: str  # after "cannot resume from RUN/checkpoint-4: "
    also_checkpoint_2: Callable[[Path], None] | None = None  # to leave no intact checkpoint


DAMAGES: dict[str, Damage] = {
    "optimizer.pt missing": Damage(removed("optimizer.pt"), "optimizer.pt is missing"),
    "scheduler.pt missing": Damage(removed("scheduler.pt"), "scheduler.pt is missing"),
    "rng_state.pth missing": Damage(removed("rng_state.pth"), "rng_state.pth is missing"),
    "data-order RNG missing": Damage(removed("rng_state_fetch_rank0.pth"), "rng_state_fetch_rank0.pth is missing"),
    "distiller state missing": Damage(removed("distiller_state_rank0.safetensors"),
                                      "distiller_state_rank0.safetensors is missing"),
    "EMA missing": Damage(removed("ema.safetensors"), "ema.safetensors is missing"),
    "weights missing": Damage(removed("model.safetensors"), "model.safetensors is missing"),
    "trainer_state.json missing": Damage(removed("trainer_state.json"), "trainer_state.json is missing"),
    "weights truncated": Damage(truncated("model.safetensors"), "model.safetensors is damaged ("),
    "trainer_state.json truncated": Damage(truncated("trainer_state.json"),
                                           "trainer_state.json is damaged (not a readable JSON file: "),
    "marker truncated": Damage(truncated(COMPLETE_MARKER), f"{COMPLETE_MARKER} is damaged (not a readable JSON"),
    "optimizer.pt garbage": Damage(overwritten("optimizer.pt"), "optimizer.pt is damaged (not a readable PyTorch"),
    "weights garbage": Damage(overwritten("model.safetensors"),
                              "model.safetensors is damaged (not a readable safetensors file: "),
    "older marker, optimizer.pt missing": Damage(unlisted(removed("optimizer.pt")), "optimizer.pt is missing"),
    "older marker, scheduler.pt garbage": Damage(unlisted(overwritten("scheduler.pt")),
                                                 "scheduler.pt is damaged (not a readable PyTorch"),
    "no intact checkpoint left": Damage(removed("rng_state.pth"), "rng_state.pth is missing",
                                        also_checkpoint_2=truncated("optimizer.pt")),
}


def copy_of(saved_run: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    source, argv = saved_run
    output = tmp_path / "run"
    shutil.copytree(source, output)
    return output, [str(output) if arg == str(source) else arg for arg in argv]


def refused(argv: list[str], root: Path, capsys) -> str:
    """Run `argv`, which must be refused in one line with status 1 and nothing under `root` changed."""
    capsys.readouterr()
    before = snapshot(root)
    status, stderr = run_cli(argv, capsys)
    assert status == 1, stderr
    (line,) = error_lines(stderr)
    assert "Traceback" not in stderr
    assert snapshot(root) == before, "a refused resume changed what was on disk"
    return line


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_newest_intact_one(name, saved_run, tmp_path,
                                                                                  capsys):
    row = DAMAGES[name]
    output, argv = copy_of(saved_run, tmp_path)
    row.damage(output / "checkpoint-4")
    if row.also_checkpoint_2:
        row.also_checkpoint_2(output / "checkpoint-2")
    line = refused([*argv, "--resume", "--epochs", "2"], tmp_path, capsys)
    assert line.startswith(f"pat-hf-train: cannot resume from {output / 'checkpoint-4'}: {row.message}"), line
    if row.also_checkpoint_2:
        assert line.endswith(f"no other checkpoint in {output} is intact: start the run again with "
                             f"--overwrite_output_dir"), line
    else:
        assert line.endswith(f"the newest intact checkpoint is {output / 'checkpoint-2'}: continue from it with "
                             f"--resume_from_checkpoint {output / 'checkpoint-2'} (the steps after it are trained "
                             f"again)"), line


def test_resume_from_checkpoint_of_a_damaged_one_names_the_newest_intact(saved_run, tmp_path, capsys):
    output, argv = copy_of(saved_run, tmp_path)
    (output / "checkpoint-2" / "scheduler.pt").unlink()
    line = refused([*argv, "--resume_from_checkpoint", str(output / "checkpoint-2"), "--epochs", "2"], tmp_path,
                   capsys)
    assert line == (f"pat-hf-train: cannot resume from {output / 'checkpoint-2'}: scheduler.pt is missing; the "
                    f"newest intact checkpoint is {output / 'checkpoint-4'}: continue from it with "
                    f"--resume_from_checkpoint {output / 'checkpoint-4'} (the steps after it are trained again)")


def test_every_saved_checkpoint_lists_its_files_and_passes_the_check(saved_run):
    output, _ = saved_run
    for step in (2, 4):
        folder = output / f"checkpoint-{step}"
        listed = json.loads((folder / COMPLETE_MARKER).read_text())[FILES_KEY]
        assert set(listed) == {p.name for p in folder.iterdir()} - {COMPLETE_MARKER}
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_fetch_rank0.pth", "ema.safetensors",
                "distiller_state_rank0.safetensors", "model.safetensors", "trainer_state.json"} <= set(listed)
        verify_checkpoint(folder)


def test_the_suggested_checkpoint_resumes_and_replaces_the_damaged_one(saved_run, tmp_path, capsys):
    output, argv = copy_of(saved_run, tmp_path)
    (output / "checkpoint-4" / "optimizer.pt").unlink()
    pat_train.main([*argv, "--resume_from_checkpoint", str(output / "checkpoint-2")])
    verify_checkpoint(output / "checkpoint-4")  # written again by the resumed run
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4
    assert not (output / LOCK_FILE).exists()


# ---- a full disk (or any failure) during a save or the export ----

def short_run(output: Path, *extra: str) -> list[str]:
    """Two steps, a checkpoint after each."""
    return student_run(output, "--max-train-samples", "32", "--save_strategy", "steps", "--save_steps", "1",
                       "--eval_strategy", "no", *extra)


def failing_writer(monkeypatch, module, name: str, folder: str, error: BaseException) -> None:
    """`module.name` (a writer) raises `error` when it writes into `folder`."""
    real = getattr(module, name)

    def write(obj, path, *args, **kwargs):
        if folder in str(path):
            raise error
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, write)


FULL_DISK_SAFETENSORS = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
WRITE_HINT = ("nothing of it was kept and the earlier checkpoints are intact: free space (or restore write access) "
              "and continue with --resume")


FIRST_WRITE_HINT = ("nothing of it was kept and the run has no earlier checkpoint: free space (or restore write "
                    "access) and start it again with --overwrite_output_dir")


@pytest.mark.parametrize("writer,error,reason,step", [
    ("safetensors", FULL_DISK_SAFETENSORS, "No space left on device", 2),
    ("safetensors", FULL_DISK_SAFETENSORS, "No space left on device", 1),
    ("torch", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     "torch could not write ([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534; is the disk "
     "full?)", 2),
])
def test_a_full_disk_during_a_save_is_one_line_and_the_staging_folder_goes(writer, error, reason, step, tmp_path,
                                                                           monkeypatch, capsys):
    output = tmp_path / "run"
    module, name = (safetensors.torch, "save_file") if writer == "safetensors" else (torch, "save")
    failing_writer(monkeypatch, module, name, f"checkpoint-{step}", error)
    status, stderr = run_cli(short_run(output), capsys)
    assert status == 1 and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    hint = WRITE_HINT if step > 1 else FIRST_WRITE_HINT
    assert line == f"pat-hf-train: could not write {output / f'checkpoint-{step}'}: {reason}; {hint}"
    earlier = [f"checkpoint-{n}" for n in range(1, step)]
    assert sorted(p.name for p in output.iterdir()) == ["args.yaml", *earlier]
    for name in earlier:
        verify_checkpoint(output / name)


def test_ctrl_c_during_a_save_leaves_no_staging_folder_and_no_lock(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    failing_writer(monkeypatch, torch, "save", "checkpoint-2", KeyboardInterrupt())
    status, stderr = run_cli(short_run(output), capsys)
    assert status == 130, stderr
    assert sorted(p.name for p in output.iterdir()) == ["args.yaml", "checkpoint-1"]


def test_a_full_disk_during_the_export_is_one_line_and_leaves_no_student(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    failing_writer(monkeypatch, safetensors.torch, "save_file", "student.partial", FULL_DISK_SAFETENSORS)
    status, stderr = run_cli(short_run(output), capsys)
    assert status == 1 and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert line == (f"pat-hf-train: could not write the student to {output / 'student'}: No space left on device; "
                    f"nothing of it was kept and the checkpoints are intact: free space (or restore write access) "
                    f"and export it with --resume")
    assert not (output / "student").exists() and not list(output.glob("*.partial"))
    assert not (output / LOCK_FILE).exists()
    verify_checkpoint(latest_complete_checkpoint(output))


def test_a_full_disk_during_the_export_of_a_run_without_checkpoints_says_to_start_again(tmp_path, monkeypatch,
                                                                                        capsys):
    output = tmp_path / "run"
    failing_writer(monkeypatch, safetensors.torch, "save_file", "student.partial", FULL_DISK_SAFETENSORS)
    status, stderr = run_cli(short_run(output, "--save_strategy", "no"), capsys)
    assert status == 1
    (line,) = error_lines(stderr)
    assert line == (f"pat-hf-train: could not write the student to {output / 'student'}: No space left on device; "
                    f"nothing of it was kept and the run saved no checkpoint to export it from: free space (or "
                    f"restore write access) and start it again with --overwrite_output_dir")
    assert not (output / "student").exists() and not list(output.glob("*.partial"))


# ---- the output-folder lock ----

def write_lock(output: Path, pid: int, host: str | None = None) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2025-01-01T00:00:00",
                                "command": "pat-hf-train --output_dir run", "token": "theirs"}))
    return path


@pytest.fixture
def sleeping_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_folder_held_by_a_live_run_is_refused_naming_it(tmp_path, sleeping_process, capsys):
    write_lock(tmp_path / "run", sleeping_process.pid)
    line = refused(student_run(tmp_path / "run"), tmp_path, capsys)
    assert line == (f"pat-hf-train: --output_dir {tmp_path / 'run'} is in use by another run: pid "
                    f"{sleeping_process.pid} on {socket.gethostname()}, started 2025-01-01T00:00:00 (pat-hf-train "
                    f"--output_dir run); wait for it to end or choose another --output_dir (if that process is not "
                    f"a pat-hf run, delete {tmp_path / 'run' / LOCK_FILE})")


@pytest.mark.parametrize("extra", [["--resume"], ["--overwrite_output_dir"]])
def test_a_held_folder_is_refused_before_its_contents_are_judged(extra, saved_run, tmp_path, sleeping_process,
                                                                  capsys):
    """A second start into a folder a live run is writing is told who holds it, whatever flags it passes."""
    output, argv = copy_of(saved_run, tmp_path)
    write_lock(output, sleeping_process.pid)
    line = refused([*argv, *extra], tmp_path, capsys)
    assert f"is in use by another run: pid {sleeping_process.pid}" in line


def test_a_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path, capsys):
    lock = write_lock(tmp_path / "run", 1234, host="gpu-node-7")
    line = refused(student_run(tmp_path / "run"), tmp_path, capsys)
    assert "is in use by another run: pid 1234 on gpu-node-7" in line
    assert line.endswith(f"(if that run is gone, delete {lock})")


def test_an_unreadable_lock_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text("")
    line = refused(student_run(tmp_path / "run"), tmp_path, capsys)
    assert "holds a lock file that names no run" in line and f"delete {tmp_path / 'run' / LOCK_FILE}" in line


class LockWatcher(TrainerCallback):
    """Records the lock file's holder while the run trains."""

    def __init__(self, output: Path):
        self.path = output / LOCK_FILE
        self.holder: dict | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self.holder = json.loads(self.path.read_text())


def test_a_stale_lock_is_taken_over_held_through_overwrite_and_released(tmp_path, caplog):
    """A lock of a dead process on this host is taken over (logged); --overwrite_output_dir keeps the run's own
    lock while it clears the old run; the lock goes when the run ends."""
    output = tmp_path / "run"
    pat_train.main(student_run(output, "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no"))
    assert not (output / LOCK_FILE).exists()
    pid = dead_pid()
    write_lock(output, pid)
    watcher = LockWatcher(output)
    with caplog.at_level("WARNING"):
        pat_train.main(student_run(output, "--overwrite_output_dir", "--max_steps", "1", "--save_strategy", "no",
                                   "--eval_strategy", "no"), callbacks=[watcher])
    assert f"taking over the lock of a run that is gone (pid {pid} on {socket.gethostname()}" in caplog.text
    assert watcher.holder["pid"] == os.getpid() and watcher.holder["host"] == socket.gethostname()
    assert watcher.holder["command"].startswith("pat-hf-train --model test_vit ")
    assert not (output / LOCK_FILE).exists()
    assert (output / "student" / "model.safetensors").is_file()


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_the_lock_is_released_after_a_failure_and_after_ctrl_c(tmp_path, capsys):
    output = tmp_path / "run"
    # Refused after the lock was taken (the model is unknown): the folder created for the lock goes too.
    status, _ = run_cli([*student_run(output), "--model", "resnet19"], capsys)
    assert status == 1 and not output.exists()
    with pytest.raises(SystemExit) as exit_info:
        failures.run_command("pat-hf-train", lambda argv: pat_train.main(argv, callbacks=[Interrupt()]),
                             student_run(output, "--save_strategy", "no", "--eval_strategy", "no"))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"pat-hf-train: interrupted; no checkpoint in {output} is complete yet; run the command again with "
        f"--overwrite_output_dir to start over")
    assert output.is_dir() and not (output / LOCK_FILE).exists()


class InterruptAtStepTwo(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt


def test_ctrl_c_after_a_checkpoint_names_it_for_resume(tmp_path, capsys):
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        failures.run_command("pat-hf-train", lambda argv: pat_train.main(argv, callbacks=[InterruptAtStepTwo()]),
                             student_run(output, "--save_strategy", "steps", "--save_steps", "1",
                                         "--eval_strategy", "no"))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"pat-hf-train: interrupted; continue with --resume (from {output / 'checkpoint-1'})")


def _race(output: str, barrier, results) -> None:
    barrier.wait()
    try:
        OutputDirLock.acquire(output)
        results.put("held")
    except OutputDirLockedError:
        results.put("refused")


@pytest.mark.parametrize("stale", [False, True])
def test_of_starts_racing_for_a_folder_exactly_one_holds_it(stale, tmp_path):
    """Processes acquiring at the same moment (over a stale lock too): one holds the folder, the others are
    refused."""
    output = tmp_path / "run"
    if stale:
        write_lock(output, dead_pid())
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_race, args=(str(output), barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join()
    assert outcomes == ["held", "refused", "refused", "refused"]
