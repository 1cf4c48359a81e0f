"""Real two-process CPU (gloo) DDP training through accelerate launch and accelerate_configs/cpu.yaml.

What "DDP equals one process" means (README.md, Failure handling and distributed runs):
- kd, and any distiller without per-process state or batch statistics: two processes on halves of a global
  batch train the same student as one process on the whole batch (up to float rounding).
- pat: its feedback (the previous step's student-teacher gap), the batch statistics of its aligners'
  BatchNorm and the reference's batch-indexed positional encoding are per process. A two-process PAT step is
  the mean of two one-process PAT steps on the halves, each with its own feedback, its own batch statistics
  and positions 0..15, from the same weights (and process 0's BatchNorm running statistics, which DDP
  broadcasts before every forward); it is not one process's step on the whole batch.
- A process that fails ends the whole run with its error; one that hangs ends it after --ddp_timeout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pat_hf.cli import train as pat_train
from pat_hf.cli.parser import parse_arguments
from pat_hf.data.examples import attach_transform
from pat_hf.data.samplers import EpochRandomSampler
from pat_hf.data.sources import load_splits
from pat_hf.data.transforms import build_criterion, build_transforms, collate, resolve_data_config_for
from pat_hf.distillers import DistillContext, get_distiller_class
from pat_hf.models.factory import create_model, create_teacher
from pat_hf.training.schedule import create_timm_optimizer
from tests.helpers import run_two_processes, save_teacher, tiny_run

ROOT = Path(__file__).resolve().parents[1]
PER_PROCESS = 16
STEPS = 3  # 96 examples / (2 processes x 16)
# Deterministic training transforms (the same whatever process draws them), a constant rate.
DETERMINISTIC = ["--scale", "1", "1", "--ratio", "1", "1", "--hflip", "0", "--color-jitter", "0",
                 "--train-interpolation", "bilinear", "--warmup-epochs", "0", "--sched", "constant",
                 "--eval_strategy", "no", "--save_strategy", "no"]
PAT = ["--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def pat_ddp_run(tmp_path_factory, teacher) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("pat_ddp")
    flags = tiny_run(root / "run", teacher, *PAT, *DETERMINISTIC, samples=96)
    result = run_two_processes(flags, PAT_HF_TEST_INITIAL=str(root / "initial.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, flags


def test_two_processes_end_with_identical_students(pat_ddp_run):
    root, _ = pat_ddp_run
    output = root / "run"
    ranks = [load_file(str(output / f"student_rank{r}_of_2.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS


def assert_close_students(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"students differ by {worst:g}"
    return worst


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_kd_on_two_processes_equals_one_process_on_the_global_batch(tmp_path, teacher):
    """A student without BatchNorm (test_vit), a frozen teacher, deterministic transforms."""
    flags = [*tiny_run(tmp_path / "ddp", teacher, "--distiller", "kd", *DETERMINISTIC, samples=96)]
    result = run_two_processes(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    pat_train.main([*tiny_run(tmp_path / "one", teacher, "--distiller", "kd", *DETERMINISTIC, samples=96),
                    "--batch-size", str(2 * PER_PROCESS)])
    two = load_file(str(tmp_path / "ddp" / "student" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    initial = create_model("test_vit", 10, {"img_size": 32, "patch_size": 4})
    assert largest_difference(one, {k: v for k, v in initial.state_dict().items()}) > 1e-4, "nothing was trained"
    assert_close_students(two, one)


class Replica:
    """One process of a DDP PAT run, simulated in this process: its own distiller (feedback, batch statistics)
    on the weights all processes share."""

    def __init__(self, flags: list[str], teacher: str, initial: dict[str, torch.Tensor]):
        args = parse_arguments(flags)
        student = create_model(args.model.model, 10, args.model.model_kwargs)
        teacher_model = create_teacher(args.model.teacher, teacher, 10)
        context = DistillContext(input_size=(3, 32, 32), num_classes=10, criterion=build_criterion(args.data))
        self.distiller = get_distiller_class("pat")(student, teacher_model, args.distill, args.hparams, context)
        self.distiller.load_state_dict(initial)
        self.distiller.train()

    def gradients(self, batch: dict[str, torch.Tensor]) -> None:
        self.distiller.zero_grad(set_to_none=True)
        self.distiller(**batch)["loss"].backward()


def global_batches(flags: list[str]) -> list[list[dict[str, torch.Tensor]]]:
    """The training batches of each step, split as accelerate shards them: process r gets the r-th half."""
    args = parse_arguments(flags)
    train_set, _, source = load_splits(args.data, seed=args.training.seed)  # the subset the run draws
    data_config = resolve_data_config_for(args.data, create_model(args.model.model, 10, args.model.model_kwargs),
                                          args.model.img_size, source)
    train_set = attach_transform(train_set, build_transforms(args.data, data_config)[0])
    order = EpochRandomSampler(len(train_set), seed=args.training.seed).indices()
    size = 2 * PER_PROCESS
    return [[collate([train_set[i] for i in order[step * size + half * PER_PROCESS:][:PER_PROCESS]])
             for half in range(2)] for step in range(STEPS)]


def simulate(flags: list[str], teacher: str, initial: dict[str, torch.Tensor], processes: int) -> dict:
    """`processes` simulated DDP processes on the halves of each global batch (1: one process on all of it)."""
    args = parse_arguments(flags)
    replicas = [Replica(flags, teacher, initial) for _ in range(processes)]
    shared = replicas[0].distiller
    optimizer = create_timm_optimizer(shared, args.recipe, args.training.learning_rate, args.training.weight_decay)
    for halves in global_batches(flags):
        batches = halves if processes == 2 else [{k: torch.cat([h[k] for h in halves]) for k in halves[0]}]
        for replica, batch in zip(replicas, batches):
            with torch.no_grad():  # DDP broadcasts process 0's buffers (BatchNorm statistics) before a forward
                for own, first in zip(replica.distiller.buffers(), shared.buffers()):
                    own.copy_(first)
            replica.gradients(batch)
        for parameters in zip(*(r.distiller.parameters() for r in replicas)):
            if parameters[0].grad is not None:
                parameters[0].grad = torch.stack([p.grad for p in parameters]).mean(0)
        optimizer.step()
        with torch.no_grad():
            for replica in replicas[1:]:
                for own, first in zip(replica.distiller.parameters(), shared.parameters()):
                    own.copy_(first)
    return {k: v.detach() for k, v in shared.student.state_dict().items()}


def test_a_two_process_pat_step_is_the_mean_of_one_process_steps_on_the_halves(pat_ddp_run, teacher):
    root, flags = pat_ddp_run
    initial = load_file(str(root / "initial.safetensors"))
    trained = load_file(str(root / "run" / "student_rank0_of_2.safetensors"))
    worst = assert_close_students(trained, simulate(flags, teacher, initial, processes=2))
    # Not one process's step on the whole batch: the feedback and batch statistics are the halves'.
    assert largest_difference(trained, simulate(flags, teacher, initial, processes=1)) > 100 * max(worst, 1e-6)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pat-hf-train: ")]


def test_a_failing_process_ends_the_run_with_its_error(tmp_path):
    flags = tiny_run(tmp_path / "run", None, "--distiller", "vanilla", *DETERMINISTIC, samples=96)
    started = time.monotonic()
    result = run_two_processes(flags, timeout=240, PAT_HF_TEST_FAIL="1:2")
    assert result.returncode != 0
    assert "pat-hf-train: process 1: RuntimeError: injected failure on rank 1 at step 2 (--debug shows the " \
           "traceback)" in error_lines(result.stderr)
    assert time.monotonic() - started < 180
    assert not (tmp_path / "run" / "student").exists()


def test_a_hanging_process_ends_the_run_after_the_ddp_timeout(tmp_path):
    flags = tiny_run(tmp_path / "run", None, "--distiller", "vanilla", *DETERMINISTIC, "--ddp_timeout", "10",
                     samples=96)
    started = time.monotonic()
    result = run_two_processes(flags, timeout=240, PAT_HF_TEST_STALL="1:2")
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert any(line.startswith("pat-hf-train: process 0: no answer from the other processes within --ddp_timeout")
               for line in error_lines(result.stderr)), result.stderr[-3000:]
    assert elapsed < 180


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--no-such-flag"]])
def test_a_bad_flag_under_a_two_process_launch_is_one_line(tmp_path, bad):
    """Every process reads the same command line: the first says what is wrong, once; the launcher turns the
    processes' status 2 into its own failure status (README.md, Failure handling)."""
    result = run_two_processes([*tiny_run(tmp_path / "run", None, "--distiller", "vanilla"), *bad], timeout=240)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("pat-hf-train")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "--batch-size" in lines[0] or "--no-such-flag" in lines[0]
    assert not (tmp_path / "run").exists()
