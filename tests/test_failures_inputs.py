"""Bad input, round 2: every value checked when it is parsed (exit status 2, naming the flag or the YAML key and
file), data that cannot train or would be labelled wrongly, damaged teacher weights, and the other commands
(pat-hf-evaluate, pat-hf-push, the reference tools) under the same contract: one line on stderr, the right exit
status, nothing on disk changed. The rows of the first round are in tests/test_failures.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image
from safetensors.torch import save_file

from pat_hf.cli import evaluate_command, push_command
from pat_hf.cli import train as pat_train
from pat_hf.config.arguments import DataArguments
from pat_hf.data.sources import load_splits
from pat_hf.models.factory import create_teacher
from pat_hf.reference import check as reference_check
from pat_hf.reference import convert as reference_convert
from tests.helpers import save_teacher
from tests.test_failures import (
    REPO,
    Row,
    assert_refused_in_one_line,
    error_lines,
    run_cli,
    snapshot,
    student_run,
    teacher_run,
    torch_teacher,
    write_config,
)


def _teacher(tmp_path: Path) -> str:
    return save_teacher(tmp_path)


def nonfinite_teacher(tmp_path: Path) -> str:
    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    weights = [name for name, tensor in state.items() if tensor.is_floating_point()]
    state[weights[0]].view(-1)[0] = float("inf")
    state[weights[-1]].view(-1)[0] = float("nan")
    path = tmp_path / "nan_teacher.safetensors"
    save_file(state, str(path))
    return str(path)


def write_images(root: Path, files: list[str]) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(name) * 7 % 255, 0, 0)).save(root / name)
    return root


def image_folder_run(layout: list[str]) -> Callable[[Path], list[str]]:
    def setup(tmp_path: Path) -> list[str]:
        data = write_images(tmp_path / "data", layout)
        return [*student_run(tmp_path / "run"), "--dataset", str(data), "--batch-size", "2",
                "--max-train-samples", "4", "--max-eval-samples", "2"]

    return setup


STUDENT_KWARGS = '{"img_size": 32, "patch_size": 4, "depthh": 2}'

ROWS: dict[str, Row] = {
    # Values out of range: refused when parsed, exit status 2, naming the flag and what it accepts.
    "kd temperature 0": Row(lambda t: teacher_run(t / "run", _teacher(t), "--kd-temperature", "0"),
                            "--kd-temperature must be positive, got 0", status=2),
    "max-train-samples 0": Row(lambda t: [*student_run(t / "run"), "--max-train-samples", "0"],
                               "--max-train-samples must be at least 1 (leave it out for every example), got 0",
                               status=2),
    "max-eval-samples 0": Row(lambda t: [*student_run(t / "run"), "--max-eval-samples", "0"],
                              "--max-eval-samples must be at least 1", status=2),
    "std without mean": Row(lambda t: [*student_run(t / "run"), "--std", "0.2", "0.2", "0.2"],
                            "--std needs --mean too: pass both", status=2),
    "mean without std": Row(lambda t: [*student_run(t / "run"), "--mean", "0.5"], "--mean needs --std too",
                            status=2),
    "std of zeros": Row(lambda t: [*student_run(t / "run"), "--mean", "0.5", "--std", "0", "0", "0"],
                        "--std takes values > 0 (images are divided by it), got [0.0, 0.0, 0.0]", status=2),
    "mean of two values": Row(lambda t: [*student_run(t / "run"), "--mean", "0.5", "0.5", "--std", "0.2"],
                              "--mean takes one value or three (R G B), got [0.5, 0.5]", status=2),
    "one opt beta": Row(lambda t: [*student_run(t / "run"), "--opt-betas", "0.9"],
                        "--opt-betas takes two values BETA1 BETA2, each in [0, 1), got [0.9]", status=2),
    "empty output_dir": Row(lambda t: [*student_run(t / "run"), "--output_dir", ""],
                            "--output_dir must name a folder", status=2),
    "smoothing 1": Row(lambda t: [*student_run(t / "run"), "--smoothing", "1"], "--smoothing must be in [0, 1), got 1",
                       status=2),
    "mixup < 0": Row(lambda t: [*student_run(t / "run"), "--mixup=-0.2"], "--mixup must be 0 or more, got -0.2",
                     status=2),
    "cutmix < 0": Row(lambda t: [*student_run(t / "run"), "--cutmix=-1"], "--cutmix must be 0 or more", status=2),
    "drop 1": Row(lambda t: [*student_run(t / "run"), "--drop", "1"], "--drop must be in [0, 1), got 1", status=2),
    "drop-path > 1": Row(lambda t: [*student_run(t / "run"), "--drop-path", "1.5"], "--drop-path must be in [0, 1)",
                         status=2),
    "hflip > 1": Row(lambda t: [*student_run(t / "run"), "--hflip", "2"], "--hflip must be in [0, 1], got 2",
                     status=2),
    "vflip < 0": Row(lambda t: [*student_run(t / "run"), "--vflip=-0.5"], "--vflip must be in [0, 1]", status=2),
    "reprob > 1": Row(lambda t: [*student_run(t / "run"), "--reprob", "1.5"], "--reprob must be in [0, 1]", status=2),
    "warmup epochs < 0": Row(lambda t: [*student_run(t / "run"), "--warmup-epochs=-1"],
                             "--warmup-epochs must be 0 or more, got -1", status=2),
    "img-size 0": Row(lambda t: [*student_run(t / "run"), "--img-size", "0"], "--img-size must be at least 1",
                      status=2),
    "epochs NaN": Row(lambda t: [*student_run(t / "run"), "--epochs", "nan"], "--epochs must be positive, got nan",
                      status=2),
    "num-classes 1": Row(lambda t: [*student_run(t / "run"), "--num-classes", "1"],
                         "--num-classes must be at least 2", status=2),
    "YAML value out of range": Row(
        lambda t: [*student_run(t / "run"), "--config", write_config(t, "hflip: 1.5\n")],
        "key 'hflip' in ", status=2),
    "YAML value of a distiller out of range": Row(
        lambda t: [*teacher_run(t / "run", _teacher(t)), "--config", write_config(t, "kd-temperature: -1\n")],
        "config.yaml must be positive, got -1", status=2),
    "config file missing": Row(lambda t: [*student_run(t / "run"), "--config", str(t / "nope.yaml")],
                               "config not found: ", status=2),
    "unknown distiller": Row(lambda t: [*student_run(t / "run"), "--distiller", "kdd"],
                             "unknown distiller 'kdd'; choose one of", status=2),
    # Unknown timm kwargs: one line naming the flag, the model and the key.
    "unknown --model-kwargs key": Row(lambda t: [*student_run(t / "run"), "--model-kwargs", STUDENT_KWARGS],
                                      "--model-kwargs: test_vit takes no argument 'depthh'", status=2),
    "unknown --teacher-kwargs key": Row(
        lambda t: teacher_run(t / "run", _teacher(t), "--teacher-kwargs", '{"widthh": 3}'),
        "--teacher-kwargs: test_resnet takes no argument 'widthh'", status=2),
    # Data that cannot train.
    "fewer examples than one batch": Row(
        lambda t: [*student_run(t / "run"), "--max-train-samples", "10"],
        "the training split has 10 examples (--max-train-samples), fewer than one batch of --batch-size 16, so no "
        "step would be trained: pass --batch-size 10 or less"),
    "fewer examples than one mixup batch": Row(
        lambda t: [*student_run(t / "run"), "--max-train-samples", "9", "--mixup", "0.2"],
        "pass --batch-size 8 or less"),
    # Image folders whose labels would be wrong.
    "class names differing in case": Row(
        image_folder_run(["train/cat/1.png", "train/dog/2.png", "val/Cat/3.png", "val/dog/4.png"]),
        "has class folder(s) 'Cat' that "),
    "a class only in the evaluation split": Row(
        image_folder_run(["train/cat/1.png", "train/dog/2.png", "val/cat/3.png", "val/bird/4.png"]),
        "has class folder(s) 'bird' that "),
    "nested class folders": Row(
        image_folder_run(["train/cat/1.png", "train/cat/kitten/2.png", "train/dog/3.png", "val/cat/4.png",
                          "val/dog/5.png"]),
        "is a folder inside the class folder "),
    # Teacher weights.
    "teacher with NaN and inf": Row(lambda t: teacher_run(t / "run", nonfinite_teacher(t)),
                                    "nan_teacher.safetensors holds NaN or inf values in 2 tensor(s) ("),
    "hf-hub teacher while offline": Row(
        lambda t: [*teacher_run(t / "run", "hf-hub:someone/not-cached-teacher")],
        "cannot load hf-hub:someone/not-cached-teacher: the Hugging Face Hub is not reachable in offline mode "
        "(HF_HUB_OFFLINE=1)"),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_and_changes_nothing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert_refused_in_one_line(ROWS[name], tmp_path, capsys)


def test_argument_errors_are_the_only_line_on_stderr(tmp_path, capsys):
    for name in ("kd temperature 0", "YAML value out of range", "unknown --model-kwargs key"):
        status, stderr = run_cli(ROWS[name].setup(tmp_path), capsys)
        assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr


def test_a_yaml_value_names_its_key_and_file_and_a_flag_overrides_it(tmp_path, capsys):
    config = write_config(tmp_path, "recount: 0\n")
    status, stderr = run_cli([*student_run(tmp_path / "run"), "--config", config], capsys)
    assert status == 2
    assert error_lines(stderr) == [f"pat-hf-train: key 'recount' in {config} must be at least 1, got 0"]
    status, stderr = run_cli([*student_run(tmp_path / "run"), "--config", config, "--recount=-3"], capsys)
    assert status == 2 and error_lines(stderr) == ["pat-hf-train: --recount must be at least 1, got -3"]


def test_a_single_mean_and_std_apply_to_every_channel(tmp_path):
    from pat_hf.cli.parser import parse_arguments

    args = parse_arguments([*student_run(tmp_path / "run"), "--mean", "0.5", "--std", "0.25"])
    assert args.data.mean == [0.5] * 3 and args.data.std == [0.25] * 3


def test_a_batch_too_large_is_refused_and_the_rerun_with_the_advised_size_trains(tmp_path, capsys):
    output = tmp_path / "run"
    status, stderr = run_cli([*student_run(output), "--max-train-samples", "10"], capsys)
    assert status == 1 and not output.exists()
    metrics = pat_train.main([*student_run(output, "--max-train-samples", "10", "--batch-size", "10"),
                              "--save_strategy", "no"])
    assert metrics["epoch"] == 1.0


def test_a_teacher_without_batchnorm_counters_is_accepted(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(model.state_dict())
    save_file(state, str(tmp_path / "no_counters.safetensors"))
    teacher = create_teacher("resnet18", str(tmp_path / "no_counters.safetensors"), 10)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())


def test_an_evaluation_folder_missing_classes_is_accepted_and_logged(tmp_path, caplog):
    data = write_images(tmp_path / "data", ["train/cat/1.png", "train/dog/2.png", "train/owl/3.png",
                                            "val/cat/4.png"])
    with caplog.at_level(logging.INFO, logger="pat_hf"):
        train, evaluation, _ = load_splits(DataArguments(dataset=str(data)))
    assert train.features["label"].names == ["cat", "dog", "owl"] and len(evaluation) == 1
    assert any("has no images of 2 of the 3 classes (dog, owl)" in r.getMessage() for r in caplog.records)


def string_labelled(path: Path, train: list[str], evaluation: list[str]) -> Path:
    def split(labels: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in
                                                     range(len(labels))], "label": labels},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "label": datasets.Value("string")}))

    datasets.DatasetDict(train=split(train), validation=split(evaluation)).save_to_disk(str(path))
    return path


def test_string_labels_are_mapped_to_sorted_classes_and_exported_as_label_names(tmp_path):
    names = ["zebra", "ant", "moth", "ant"] * 8
    data = string_labelled(tmp_path / "strings", names, ["moth", "zebra", "ant", "ant"])
    train, evaluation, _ = load_splits(DataArguments(dataset=str(data), max_train_samples=8))
    assert train.features["label"].names == ["ant", "moth", "zebra"]
    assert evaluation.features["label"].names == ["ant", "moth", "zebra"]
    assert evaluation["label"] == [1, 2, 0, 0]
    output = tmp_path / "run"
    pat_train.main([*student_run(output, "--dataset", str(data), "--batch-size", "8", "--max-eval-samples", "4"),
                    "--save_strategy", "no"])
    assert json.loads((output / "student" / "config.json").read_text())["label_names"] == ["ant", "moth", "zebra"]


def test_string_labels_unknown_to_the_training_split_are_refused(tmp_path, capsys):
    data = string_labelled(tmp_path / "strings", ["ant", "moth"] * 4, ["ant", "wasp"])
    before = snapshot(tmp_path)
    status, stderr = run_cli([*student_run(tmp_path / "run"), "--dataset", str(data), "--batch-size", "4"], capsys)
    assert status == 1
    (line,) = error_lines(stderr)
    assert "the evaluation split has labels the training split has not ('wasp' in column 'label')" in line
    assert snapshot(tmp_path) == before


# ---- pat-hf-evaluate -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run: OUTPUT_DIR with args.yaml, checkpoint-4 (no EMA) and student/."""
    output = tmp_path_factory.mktemp("evaluate") / "run"
    pat_train.main(student_run(output))
    return output


def run_command_in_process(command: Callable[[list[str]], None], argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a console entry point run in this process."""
    capsys.readouterr()
    try:
        command(argv)
        code = 0
    except SystemExit as exit_request:
        code = exit_request.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def partial_export(finished: Path, tmp_path: Path) -> list[str]:
    partial = tmp_path / "student.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((finished / "student" / "model.safetensors").read_bytes()[:100])
    return [str(partial)]


def not_a_checkpoint_file(tmp_path: Path) -> list[str]:
    (tmp_path / "notes.txt").write_text("hello")
    return [str(tmp_path / "notes.txt")]


EVALUATE_ROWS: dict[str, tuple[Callable[[Path, Path], list[str]], str, int]] = {
    "path missing": (lambda f, t: [str(t / "nope")], "pat-hf-evaluate: error: not found: ", 2),
    "an empty folder": (lambda f, t: [str(t)], "is neither an exported student (no config.json) nor a training "
                                                "checkpoint", 1),
    "the run folder itself": (lambda f, t: [str(f)], "(it holds checkpoint-4, student: pass one of them)", 1),
    "an unfinished export": (lambda f, t: partial_export(f, t), "is an unfinished export (the run stopped while "
                                                                "writing it): run the training command again with "
                                                                "--resume", 1),
    "--use-ema without EMA": (lambda f, t: [str(f / "checkpoint-4"), "--use-ema"],
                              "ema.safetensors not found (the run was trained without --model-ema)", 1),
    "--use-ema on an export": (lambda f, t: [str(f / "student"), "--use-ema"],
                               "--use-ema applies to training checkpoints", 2),
    "a file that is no checkpoint": (lambda f, t: not_a_checkpoint_file(t), "is not a checkpoint's "
                                                                             "model.safetensors", 1),
    "--json under a file": (lambda f, t: [str(f / "student"), "--json", str(f / "args.yaml" / "r.json")],
                            "cannot be written: ", 2),
    "--json a folder": (lambda f, t: [str(f / "student"), "--json", str(t)], "is a folder; pass a file name", 2),
    "--batch_size 0": (lambda f, t: [str(f / "student"), "--batch_size", "0"], "--batch_size must be at least 1", 2),
    "--max-eval-samples 0": (lambda f, t: [str(f / "student"), "--max-eval-samples", "0"],
                             "--max-eval-samples must be at least 1", 2),
    "--model_kwargs unknown key": (lambda f, t: [str(f / "checkpoint-4" / "model.safetensors"), "--model", "test_vit",
                                                 "--model_kwargs", STUDENT_KWARGS],
                                   "--model_kwargs: test_vit takes no argument 'depthh'", 2),
}


@pytest.mark.parametrize("name", list(EVALUATE_ROWS))
def test_evaluate_fails_in_one_line_and_changes_nothing(name, finished, tmp_path, capsys):
    setup, message, expected = EVALUATE_ROWS[name]
    argv = [*setup(finished, tmp_path), "--dataset", "digits", "--max-eval-samples", "8", "--no_progress_bar"] \
        if name not in ("--max-eval-samples 0",) else [*setup(finished, tmp_path), "--no_progress_bar"]
    before, run_before = snapshot(tmp_path), snapshot(finished)
    status, _, stderr = run_command_in_process(evaluate_command, argv, capsys)
    assert status == expected, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pat-hf-evaluate: ") and message in lines[0], stderr
    assert snapshot(tmp_path) == before and snapshot(finished) == run_before


def test_evaluate_succeeds_with_status_0_and_creates_the_json_folder(finished, tmp_path, capsys):
    result_file = tmp_path / "results" / "digits" / "student.json"
    status, out, err = run_command_in_process(
        evaluate_command, [str(finished / "student"), "--json", str(result_file), "--no_progress_bar"], capsys)
    assert status == 0 and "top1" in out and "pat-hf-evaluate" not in err
    assert json.loads(result_file.read_text())["images"] == 32


# ---- pat-hf-push and the reference tools -----------------------------------------------------------------------


def test_push_offline_advises_its_own_flags(finished, capsys, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    before = snapshot(finished)
    status, _, stderr = run_command_in_process(push_command, [str(finished / "student"), "someone/x"], capsys)
    assert status == 1
    (line,) = stderr.strip().splitlines()
    assert line.startswith("pat-hf-push: cannot push to the Hub repository 'someone/x': ") and "offline" in line
    assert "--token" in line and "--hub_token" not in line and "--hub_model_id" not in line
    assert snapshot(finished) == before


@pytest.mark.parametrize("argv,message", [
    (lambda f: [str(f), "someone/x"], "is not an exported student (no config.json, model.safetensors, README.md)"),
    (lambda f: [str(f / "student"), "someone/x", "--hub_token", "hf_x"], "unrecognized arguments: --hub_token"),
    (lambda f: [str(f / "student")], "the following arguments are required: repo_id"),
])
def test_push_argument_errors_are_one_line_with_status_2(argv, message, finished, capsys):
    status, _, stderr = run_command_in_process(push_command, argv(finished), capsys)
    assert status == 2
    (line,) = stderr.strip().splitlines()
    assert line.startswith("pat-hf-push: error: ") and message in line


def test_the_reference_tools_fail_in_one_line(tmp_path, capsys):
    convert = ["--distiller", "kd", "--model", "test_resnet", "--num-classes", "10", "--output", str(tmp_path / "out")]
    teacher = torch_teacher(tmp_path)
    cases = [
        (reference_convert.command, [str(tmp_path / "nope.pth"), *convert], 1,
         "python -m pat_hf.reference: checkpoint not found: "),
        (reference_convert.command, [teacher, *convert, "--model-kwargs", "[1]"], 2,
         "python -m pat_hf.reference: --model-kwargs must be a JSON object, got '[1]'"),
        (reference_convert.command, [teacher, *convert, "--model-kwargs", '{"widthh": 2}'], 2,
         "python -m pat_hf.reference: --model-kwargs: test_resnet takes no argument 'widthh'"),
        (reference_convert.command, [teacher], 2,
         "python -m pat_hf.reference: error: the following arguments are required"),
        (reference_check.command, [str(tmp_path / "nope.safetensors")], 2,
         "python -m pat_hf.reference.check: error: "),
    ]
    for command, argv, expected, message in cases:
        before = snapshot(tmp_path)
        status, _, stderr = run_command_in_process(command, argv, capsys)
        assert status == expected, stderr
        (line,) = stderr.strip().splitlines()
        assert line.startswith(message), line
        assert snapshot(tmp_path) == before


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    # A shell that starts a job in the background (`pytest &`) makes it ignore SIGINT, and Python keeps an ignored
    # SIGINT ignored: the child gets the default disposition back, as from a terminal.
    process = subprocess.Popen([sys.executable, "-m", "pat_hf.train", "--config", "smoke", "--output_dir",
                                str(tmp_path / "run")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("pat-hf-train: interrupted")
    assert not (tmp_path / "run").exists()
