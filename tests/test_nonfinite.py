"""NaN and inf losses: found on the step they appear without a per-step host sync, the run stops naming the step
and the component, and nothing non-finite is ever saved, exported or pushed; --skip-nonfinite-steps N passes over
up to N such steps without their update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pat_hf.cli import failures
from pat_hf.cli import train as pat_train
from pat_hf.training.checkpoints import COMPLETE_MARKER, checkpoint_folders
from pat_hf.training.meters import TrainingMeters
from pat_hf.training.nonfinite import NonFiniteError, NonFiniteLossGuard
from tests.helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


class PoisonSteps(TrainerCallback):
    """Makes the student's logits NaN during the given training steps, and keeps the student after each step."""

    def __init__(self, steps: set[int]):
        self.steps = steps
        self.poison = False
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.student = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.student = model.student
        model.student.register_forward_hook(lambda module, inputs, out: out * float("nan") if self.poison else out)

    def on_step_begin(self, args, state, control, **kwargs):
        self.poison = state.global_step + 1 in self.steps

    def on_step_end(self, args, state, control, **kwargs):
        self.poison = False
        self.weights[state.global_step] = {k: v.clone() for k, v in self.student.state_dict().items()}


def run_argv(output: Path, *extra: str) -> list[str]:
    """8 steps of a student alone (no teacher), checkpoints every 2 steps."""
    return tiny_run(output, None, "--distiller", "vanilla", "--max-train-samples", "64", "--batch-size", "8",
                    "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "10",
                    "--logging_steps", "4", "--eval_strategy", "no", *extra)


def assert_every_checkpoint_complete_and_finite(output: Path) -> list[str]:
    names = []
    for folder in checkpoint_folders(output):
        assert (folder / COMPLETE_MARKER).is_file(), folder
        for name in ("model.safetensors",):
            assert all(torch.isfinite(t).all() for t in load_file(str(folder / name)).values()), folder
        names.append(folder.name)
    assert not list(output.glob("*.partial"))
    return names


def test_the_guard_reads_nothing_back_while_it_records():
    """observe() runs on the meta device, where any read back to the host would fail: it does none."""
    guard = NonFiniteLossGuard()
    for step in range(1, 4):
        guard.observe(step, {"loss": torch.empty((), device="meta"), "loss_gt": torch.empty((), device="meta")})
    assert guard._step.device.type == "meta"


def test_the_guard_keeps_the_first_bad_step_and_its_components():
    from accelerate import Accelerator

    guard = NonFiniteLossGuard()
    guard.observe(1, {"loss": torch.tensor(1.0), "loss_kd": torch.tensor(0.5), "loss_gt": torch.tensor(0.5)})
    assert guard.first_bad_step(Accelerator(cpu=True)) is None
    guard.observe(2, {"loss": torch.tensor(float("nan")), "loss_kd": torch.tensor(0.2),
                      "loss_gt": torch.tensor(float("nan"))})
    guard.observe(3, {"loss": torch.tensor(float("inf")), "loss_kd": torch.tensor(float("inf")),
                      "loss_gt": torch.tensor(1.0)})
    step, values = guard.first_bad_step(Accelerator(cpu=True))
    assert step == 2 and list(values) == ["loss_gt", "loss_kd", "loss"]
    assert values["loss_kd"] == pytest.approx(0.2)
    with pytest.raises(NonFiniteError, match=r"not finite at step 2: loss_gt is nan \(loss_gt nan, loss_kd 0.2, "
                                             r"loss nan\)"):
        guard.raise_if_bad(Accelerator(cpu=True), "hint")


def test_the_logged_loss_is_the_mean_of_the_window():
    meters = TrainingMeters(type("OneProcess", (), {"reduce": staticmethod(lambda t, reduction: t)})())
    for total, gt in ((3.0, 1.0), (1.0, 0.5)):
        meters.add({"loss": torch.tensor(total), "loss_gt": torch.tensor(gt)}, batch_size=8)
    logs = meters.window_logs(torch.device("cpu"))
    assert logs["loss"] == 2.0 and logs["loss_gt"] == 0.75


def test_a_nan_step_stops_the_run_before_anything_of_it_is_saved(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(NonFiniteError) as error:
        pat_train.main(run_argv(output), callbacks=[PoisonSteps({3})])
    line = failures.error_line(error.value)
    assert line.startswith("the training loss is not finite at step 3: loss_gt is nan (loss_gt nan, loss nan); "
                           "the run stopped and saved nothing from that step on")
    assert "Lower --lr (now 0.001)" in line and "--skip-nonfinite-steps N" in line
    # Found at the logging step 4, before its checkpoint: only step 2's, complete and finite.
    assert assert_every_checkpoint_complete_and_finite(output) == ["checkpoint-2"]
    assert not (output / "student").exists()


def test_skipped_steps_leave_the_weights_and_the_run_goes_on(tmp_path):
    poison = PoisonSteps({3, 5})
    pat_train.main(run_argv(tmp_path / "run", "--skip-nonfinite-steps", "2"), callbacks=[poison])
    for skipped in (3, 5):
        before, after = poison.weights[skipped - 1], poison.weights[skipped]
        assert all(torch.equal(before[k], after[k]) for k in before), f"step {skipped} updated the weights"
    assert not all(torch.equal(poison.weights[1][k], poison.weights[2][k]) for k in poison.weights[1])
    assert assert_every_checkpoint_complete_and_finite(tmp_path / "run")[-1] == "checkpoint-8"
    exported = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in exported.values())
    logged = [h for h in json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
              if "loss_gt" in h]
    assert logged and all(h["loss"] == pytest.approx(h["loss_gt"]) and h["loss"] > 0 for h in logged)


def test_more_bad_steps_than_allowed_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteError, match="not finite at step 6: loss_gt is nan .*more than "
                                             "--skip-nonfinite-steps 2 such steps"):
        pat_train.main(run_argv(tmp_path / "run", "--skip-nonfinite-steps", "2"), callbacks=[PoisonSteps({2, 3, 6})])
    assert assert_every_checkpoint_complete_and_finite(tmp_path / "run") == ["checkpoint-2", "checkpoint-4"]


def test_a_huge_learning_rate_stops_in_one_line_and_exports_nothing(tmp_path):
    """The user's case: --lr 1e6 used to exit 0 with NaN everywhere and a model card."""
    output = tmp_path / "run"
    argv = tiny_run(output, None, "--distiller", "vanilla", "--lr", "1e6", "--warmup-epochs", "0", "--epochs", "2",
                    "--max-train-samples", "32", "--batch-size", "8", "--logging_steps", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pat_hf.cli.train", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("pat-hf-train: ")]
    assert "the training loss is not finite at step" in line and "Lower --lr (now 1e+06)" in line
    assert "Traceback" not in result.stderr
    assert not (output / "student").exists() and not list(tmp_path.rglob("README.md"))
    assert_every_checkpoint_complete_and_finite(output)
