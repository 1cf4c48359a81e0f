"""Bad input, each row a test: the run refuses with ONE line on stderr that names the problem and what to do (no
traceback), exits non-zero, and leaves everything already on disk as it was (a fresh --output_dir is not even
created). Rows go through `cli()` in this process; a representative few through a real `python -m pat_hf.cli.train`.
The data rows (missing folders, bad images, ...) are in tests/test_data.py."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from pat_hf.cli import train as pat_train
from pat_hf.cli.parser import parse_arguments
from pat_hf.training.checkpoints import mark_complete
from pat_hf.training.resume import teacher_weights_id
from tests.helpers import save_teacher, tiny_run

REPO = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "pat-hf-train: "


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def student_run(output: Path, *extra: str) -> list[str]:
    return tiny_run(output, None, "--distiller", "vanilla", *extra)


def teacher_run(output: Path, teacher: str, *extra: str) -> list[str]:
    return tiny_run(output, teacher, "--distiller", "kd", *extra)


def pat_run(output: Path, teacher: str, *extra: str) -> list[str]:
    return tiny_run(output, teacher, "--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16",
                    *extra)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def finished_run(output: Path, with_checkpoint: bool) -> None:
    """What a finished run leaves (its files' content does not matter to the checks at start)."""
    (output / "student").mkdir(parents=True)
    (output / "student" / "model.safetensors").write_bytes(b"weights")
    (output / "args.yaml").write_text("model: {}\n")
    (output / "trainer_state.json").write_text("{}")
    (output / "summary.csv").write_text("epoch,lr\n1.0,0.001\n")
    if with_checkpoint:
        (output / "checkpoint-4").mkdir()
        (output / "checkpoint-4" / "model.safetensors").write_bytes(b"weights")


def checkpoint_of(argv: list[str], step: int = 4, epoch: float = 1.0) -> Path:
    """A complete checkpoint of the run `argv` describes (only its marker and state are read at start)."""
    args = parse_arguments(argv)
    folder = Path(args.training.output_dir) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": step}))
    (folder.parent / "args.yaml").write_text(yaml.safe_dump({"run": "earlier"}))
    mark_complete(folder, {**args.run_identity(teacher_weights_id(args)), "global_step": step})
    return folder


def pickled_payload_teacher(tmp_path: Path) -> str:
    """A teacher .pth whose unpickling would create tmp_path/pwned."""

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (tmp_path / "pwned",)

    path = tmp_path / "evil_teacher.pth"
    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=10).state_dict(), "x": Payload()}, path)
    return str(path)


def truncated(path: str) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def torch_teacher(tmp_path: Path, name: str = "test_resnet", num_classes: int = 10) -> str:
    path = tmp_path / f"{name}_{num_classes}.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": timm.create_model(name, num_classes=num_classes).state_dict()}, path)
    return str(path)


def random_bytes_teacher(tmp_path: Path) -> str:
    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(4096))
    return str(path)


def changed_teacher(tmp_path: Path) -> list[str]:
    teacher = save_teacher(tmp_path)
    argv = [*teacher_run(tmp_path / "run", teacher), "--resume"]
    checkpoint_of(argv)
    torch.manual_seed(1)
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)  # same path, new weights
    return argv


def changed_setting(make_argv: Callable[[Path], list[str]], change: list[str]) -> Callable[[Path], list[str]]:
    """A resume of a checkpoint saved by `make_argv`'s run, with `change` on the command line."""
    def setup(tmp_path: Path) -> list[str]:
        argv = [*make_argv(tmp_path), "--resume"]
        checkpoint_of(argv)
        return [*argv, *change]

    return setup


def another_distiller(tmp_path: Path) -> list[str]:
    argv = [*student_run(tmp_path / "run"), "--resume"]
    checkpoint_of(argv)
    return [*argv, "--distiller", "kd", "--teacher", "test_resnet", "--teacher-pretrained", save_teacher(tmp_path)]


def fewer_epochs_than_trained(tmp_path: Path) -> list[str]:
    argv = [*student_run(tmp_path / "run", "--epochs", "3"), "--resume"]
    checkpoint_of(argv, step=8, epoch=2.0)
    return [*argv, "--epochs", "1"]


def over_finished_run(with_checkpoint: bool, *extra: str) -> Callable[[Path], list[str]]:
    def setup(tmp_path: Path) -> list[str]:
        finished_run(tmp_path / "run", with_checkpoint)
        return [*student_run(tmp_path / "run"), *extra]

    return setup


def under_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "file").write_text("not a folder")
    return student_run(tmp_path / "file" / "run")


@dataclass(frozen=True)
class Row:
    setup: Callable[[Path], list[str]]
    message: str
    status: int = 1


def _teacher(tmp_path: Path) -> str:
    return save_teacher(tmp_path)


ROWS: dict[str, Row] = {
    # Arguments: checked before any data is read or model built.
    "unknown flag": Row(lambda t: [*student_run(t / "run"), "--no-such-flag", "1"],
                        "unrecognized arguments: --no-such-flag 1", status=2),
    "unknown YAML key": Row(lambda t: [*student_run(t / "run"), "--config", write_config(t, "learning_rat: 0.1\n")],
                            "unknown key 'learning_rat' in", status=2),
    "wrong type, flag": Row(lambda t: [*student_run(t / "run"), "--batch-size", "sixteen"],
                            "invalid int value: 'sixteen'", status=2),
    "wrong type, YAML": Row(lambda t: [*student_run(t / "run"), "--config", write_config(t, "lr: fast\n")],
                            "config.yaml: lr takes float, got 'fast'", status=2),
    "batch size 0": Row(lambda t: [*student_run(t / "run"), "--batch-size", "0"],
                        "--batch-size must be positive, got 0", status=2),
    "batch size < 0": Row(lambda t: [*student_run(t / "run"), "--batch-size=-8"], "--batch-size must be positive",
                          status=2),
    "epochs 0": Row(lambda t: [*student_run(t / "run"), "--epochs", "0"], "--epochs must be positive, got 0", status=2),
    "lr 0": Row(lambda t: [*student_run(t / "run"), "--lr", "0"], "--lr must be positive, got 0", status=2),
    "lr < 0": Row(lambda t: [*student_run(t / "run"), "--lr=-0.1"], "--lr must be positive, got -0.1", status=2),
    "region-attention queries not 4k^2": Row(lambda t: pat_run(t / "run", _teacher(t), "--pat-raa-num-queries", "80"),
                                             "--pat-raa-num-queries must be 4*k*k", status=2),
    "stage list out of range": Row(lambda t: pat_run(t / "run", _teacher(t), "--pat-afp-stage", "0", "5"),
                                   "--pat-afp-stage takes stages 1-4, got [0, 5]", status=2),
    "skip-nonfinite-steps < 0": Row(lambda t: [*student_run(t / "run"), "--skip-nonfinite-steps=-1"],
                                    "--skip-nonfinite-steps must be 0 or more", status=2),
    # Models and weights (the image size is checked once the models are built, before any image is decoded).
    "image size the model cannot take": Row(
        lambda t: [*student_run(t / "run"), "--model-kwargs", '{"patch_size": 4}', "--img-size", "30"],
        "test_vit cannot run at an input size of 30x30 (--img-size): Input height (30) should be divisible by patch "
        "size (4)"),
    "unknown timm model": Row(lambda t: [*student_run(t / "run"), "--model", "resnet19"],
                              "unknown timm model 'resnet19'; did you mean resnet18"),
    "teacher file missing": Row(lambda t: teacher_run(t / "run", str(t / "nope.safetensors")),
                                "teacher checkpoint not found: "),
    "teacher .pth truncated": Row(lambda t: teacher_run(t / "run", truncated(torch_teacher(t))),
                                  "is not a readable checkpoint (truncated, or not a PyTorch or safetensors file"),
    "teacher .safetensors truncated": Row(lambda t: teacher_run(t / "run", truncated(save_teacher(t))),
                                          "is not a readable checkpoint (truncated, or not a PyTorch or safetensors"),
    "teacher file random bytes": Row(lambda t: teacher_run(t / "run", random_bytes_teacher(t)),
                                     "random.pth is not a readable checkpoint"),
    "teacher of another architecture": Row(lambda t: teacher_run(t / "run", torch_teacher(t, "test_convnext")),
                                           "test_convnext_10.pth does not fit test_resnet: "),
    "teacher of fewer classes than the data": Row(lambda t: teacher_run(t / "run", torch_teacher(t, num_classes=5)),
                                                  "has a 5-class classifier but the data has 10 classes"),
    "teacher with a pickled payload": Row(lambda t: teacher_run(t / "run", pickled_payload_teacher(t)),
                                          "holds a pickled object outside the allow-list (getattr), refused"),
    # Output folder.
    "finished run without checkpoints": Row(over_finished_run(False),
                                            "already holds a run; pass --overwrite_output_dir to replace it"),
    "finished run with checkpoints": Row(over_finished_run(True),
                                         "already holds checkpoints; pass --resume to continue that run, "
                                         "--overwrite_output_dir to replace it"),
    "--resume of a run without checkpoints": Row(over_finished_run(False, "--resume"),
                                                 "no complete checkpoint-* folder in"),
    "--resume with --overwrite_output_dir": Row(
        over_finished_run(True, "--resume", "--overwrite_output_dir"),
        "--resume continues the run in --output_dir and --overwrite_output_dir replaces it: pass one of them"),
    "output folder under a file": Row(under_a_file, "file is a file, not a folder; choose another --output_dir"),
    # Resume: every setting that changes what is trained is checked against the checkpoint.
    "resume, teacher weights changed": Row(changed_teacher, "teacher_weights: checkpoint 'sha256:"),
    "resume, --pat-mode changed": Row(changed_setting(lambda t: pat_run(t / "run", _teacher(t)),
                                                      ["--pat-mode", "corrected"]),
                                      "pat_mode: checkpoint 'reference', this run 'corrected'"),
    "resume, distiller hyper-parameter changed": Row(
        changed_setting(lambda t: teacher_run(t / "run", _teacher(t)), ["--kd-temperature", "4"]),
        "kd_temperature: checkpoint 1.0, this run 4.0"),
    "resume, batch size changed": Row(changed_setting(lambda t: student_run(t / "run"), ["--batch-size", "8"]),
                                      "batch_size: checkpoint 16, this run 8"),
    "resume, image size changed": Row(changed_setting(lambda t: student_run(t / "run"), ["--img-size", "48"]),
                                      "img_size: checkpoint 32, this run 48"),
    "resume, data changed": Row(changed_setting(lambda t: student_run(t / "run"), ["--max-train-samples", "32"]),
                                "max_train_samples: checkpoint 64, this run 32"),
    "resume, split changed": Row(changed_setting(lambda t: student_run(t / "run"), ["--val-split", "train"]),
                                 "val_split: checkpoint None, this run 'train'"),
    "resume, another distiller": Row(another_distiller,
                                     "belongs to another run (teacher: checkpoint '', this run 'test_resnet'; "
                                     "distiller: checkpoint 'vanilla', this run 'kd')"),
    "resume, another student": Row(changed_setting(lambda t: student_run(t / "run"), ["--model", "test_resnet"]),
                                   "belongs to another run (model: checkpoint 'test_vit', this run 'test_resnet')"),
    "resume, fewer epochs than trained": Row(fewer_epochs_than_trained, "has already trained 2 epochs, more than "
                                                                        "--epochs 1 plans; pass --epochs 2 or more"),
}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of the console script run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        pat_train.cli(argv)
    code, stderr = exit_info.value.code, capsys.readouterr().err
    if isinstance(code, str):  # the interpreter prints such a message on stderr and exits with status 1
        return 1, stderr + code + "\n"
    return code, stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def assert_refused_in_one_line(row: Row, tmp_path: Path, capsys) -> None:
    """The row's start is refused with its status and one line holding its message, and changes nothing."""
    argv = row.setup(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    status, stderr = run_cli(argv, capsys)
    assert status == row.status, stderr
    (line,) = error_lines(stderr)
    assert row.message in line, line
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before, "a refused start changed what was on disk"


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_and_changes_nothing(name, tmp_path, capsys):
    assert_refused_in_one_line(ROWS[name], tmp_path, capsys)
    assert not (tmp_path / "pwned").exists(), "the pickled payload ran"


def test_argument_errors_are_the_only_line_on_stderr(tmp_path, capsys):
    for name in ("unknown flag", "batch size 0", "wrong type, YAML"):
        _, stderr = run_cli(ROWS[name].setup(tmp_path), capsys)
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    status, stderr = run_cli([*student_run(tmp_path / "run"), "--model", "resnet19", "--debug"], capsys)
    assert status == 1
    assert "Traceback (most recent call last)" in stderr and "ValueError: unknown timm model" in stderr


def test_a_class_count_hint_is_one_that_is_accepted(tmp_path):
    """A 100-class teacher on 10-class data suggests --num-classes 100; the run then gets past the check."""
    teacher = save_teacher(tmp_path, num_classes=100)
    with pytest.raises(ValueError, match="pass --num-classes 100") as error:
        pat_train.main(teacher_run(tmp_path / "run", teacher))
    assert "\n" not in str(error.value)
    pat_train.main(teacher_run(tmp_path / "run", teacher, "--num-classes", "100", "--max_steps", "1",
                               "--eval_strategy", "no", "--save_strategy", "no"))
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def run_module(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "pat_hf.cli.train", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("name", ["batch size 0", "teacher file random bytes", "finished run with checkpoints"])
def test_the_console_script_fails_in_one_line(name, tmp_path):
    row = ROWS[name]
    argv = row.setup(tmp_path)
    before = snapshot(tmp_path)
    result = run_module(argv)
    assert result.returncode == row.status
    (line,) = error_lines(result.stderr)
    assert row.message in line and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


@contextlib.contextmanager
def unwritable_folder(path: Path) -> Iterator[Path]:
    """A folder this process cannot write into: read-only by its mode, or, for root (who ignores modes),
    immutable (chattr +i)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("root needs chattr +i for a folder it cannot write")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_unwritable_output_folder_is_refused_before_anything_is_read(tmp_path, capsys):
    with unwritable_folder(tmp_path / "readonly") as readonly:
        status, stderr = run_cli(student_run(readonly / "run"), capsys)
        assert status == 1
        (line,) = error_lines(stderr)
        assert line == (f"pat-hf-train: --output_dir {readonly / 'run'} cannot be created: {readonly} not writable "
                        f"by this user; fix its permissions or choose another --output_dir")
        assert list(readonly.iterdir()) == []


def test_overwrite_output_dir_replaces_a_finished_run_and_a_failed_start_keeps_it(tmp_path):
    output = tmp_path / "run"
    pat_train.main(student_run(output, "--save_strategy", "no"))
    (output / "checkpoint-999").mkdir()  # an old checkpoint, to see it go
    (output / "notes.txt").write_text("mine")  # not the run's: stays
    finished = snapshot(output)

    with pytest.raises(ValueError, match="unknown timm model"):
        pat_train.main(student_run(output, "--overwrite_output_dir", "--model", "resnet19"))
    assert snapshot(output) == finished, "a failed start cleared the old run"

    pat_train.main(student_run(output, "--overwrite_output_dir", "--epochs", "2", "--save_strategy", "no"))
    assert not (output / "checkpoint-999").exists() and (output / "notes.txt").read_text() == "mine"
    with open(output / "summary.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "1.0", "2.0"]
    assert yaml.safe_load((output / "args.yaml").read_text())["training"]["num_train_epochs"] == 2


def test_the_refusals_leave_a_checkpointed_run_resumable(tmp_path):
    """After refused starts of every kind the run still resumes (nothing of it was touched)."""
    output = tmp_path / "run"
    pat_train.main(student_run(output, "--epochs", "1"))
    for bad in (["--batch-size", "0"], ["--resume", "--batch-size", "8"], ["--model", "resnet19"]):
        with pytest.raises((ValueError, OSError)):
            pat_train.main([*student_run(output), *bad])
    metrics = pat_train.main([*student_run(output, "--epochs", "2"), "--resume"])
    assert metrics["epoch"] == 2.0


def test_resume_ignore_changes_continues_with_the_new_settings(tmp_path):
    output = tmp_path / "run"
    pat_train.main(student_run(output, "--epochs", "1"))
    with pytest.raises(ValueError, match="weight_decay: checkpoint 2e-05, this run 0.1"):
        pat_train.main([*student_run(output, "--epochs", "2", "--weight-decay", "0.1"), "--resume"])
    pat_train.main([*student_run(output, "--epochs", "2", "--weight-decay", "0.1"), "--resume",
                    "--resume-ignore-changes"])
    assert yaml.safe_load((output / "args.yaml").read_text())["training"]["weight_decay"] == 0.1
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 8


def test_a_teacher_copied_elsewhere_is_the_same_teacher(tmp_path):
    """The teacher is identified by its content: a resumed run may find the same file under another path."""
    teacher = save_teacher(tmp_path)
    argv = [*teacher_run(tmp_path / "run", teacher), "--resume"]
    checkpoint_of(argv)
    moved = str(shutil.copy(teacher, tmp_path / "moved.safetensors"))
    args = parse_arguments([*argv, "--teacher-pretrained", moved])
    identity = args.run_identity(teacher_weights_id(args))
    from pat_hf.training.checkpoints import check_resumable

    assert check_resumable(tmp_path / "run" / "checkpoint-4", identity) == []
