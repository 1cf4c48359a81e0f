"""On a CUDA GPU: mixed-precision training through `accelerate launch` with accelerate_configs/single_gpu.yaml,
and a killed fp16 run that resumes exactly, GradScaler state included.

Marked `cuda`, deselected by default: `pytest -m cuda tests/test_cuda.py` (benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pat_hf.training.checkpoints import COMPLETE_MARKER
from tests.helpers import save_teacher, tiny_run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here")]

ROOT = Path(__file__).resolve().parents[1]
PROBE_FILE = "cuda_probe.json"


def launch(flags: list[str], kill_after_step: int = 0) -> subprocess.CompletedProcess:
    """tests/cuda_worker.py through accelerate launch; it writes what it saw to OUTPUT_DIR/cuda_probe.json."""
    output_dir = Path(flags[flags.index("--output_dir") + 1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "KILL_AFTER_SAVE_STEP": str(kill_after_step),
           "CUDA_PROBE": str(output_dir / PROBE_FILE)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "single_gpu.yaml"), str(ROOT / "tests" / "cuda_worker.py"), *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.parametrize(("amp_dtype", "autocast", "has_scaler"),
                         [("float16", "torch.float16", True), ("bfloat16", "torch.bfloat16", False)])
def test_mixed_precision_training_through_accelerate_launch(tmp_path, amp_dtype, autocast, has_scaler):
    output = tmp_path / "run"
    flags = tiny_run(output, save_teacher(tmp_path), "--distiller", "pat", "--pat-raa-dim", "32",
                     "--pat-raa-num-queries", "16", "--amp", "--amp-dtype", amp_dtype)
    assert_ok(launch(flags))

    assert json.loads((output / PROBE_FILE).read_text()) == {"device": "cuda", "autocast": autocast}
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 64 examples / batch 16
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    scaler_file = output / "checkpoint-4" / "scaler.pt"
    assert scaler_file.is_file() == has_scaler  # fp16 trains with accelerate's GradScaler, bf16 without
    if has_scaler:
        scale = torch.load(scaler_file, weights_only=True)["scale"]
        assert math.isfinite(scale) and scale > 0
    student = load_file(str(output / "student" / "model.safetensors"))
    assert {tensor.dtype for tensor in student.values() if tensor.is_floating_point()} == {torch.float32}


STEPS_PER_EPOCH, SAVE_STEPS, TOTAL_STEPS = 6, 4, 24  # 48 samples, batch 8, 4 epochs; the kill at step 8 is mid-epoch


def resume_flags(teacher: str, output: Path) -> list[str]:
    return ["--model", "test_resnet", "--teacher", "test_convnext", "--teacher-pretrained", teacher,
            "--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16", "--num-classes", "10",
            "--img-size", "32", "--batch-size", "8", "--max_train_samples", "48", "--max_eval_samples", "16",
            "--epochs", "4", "--warmup-epochs", "1", "--opt", "adamw", "--lr", "1e-3", "--mixup", "0.8",
            "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.9", "--amp", "--save_strategy", "steps",
            "--save_steps", str(SAVE_STEPS), "--save_total_limit", "2", "--report_to", "none",
            "--disable_tqdm", "true", "--workers", "0", "--output_dir", str(output)]


def scaler_state(checkpoint: Path) -> tuple[float, int]:
    state = torch.load(checkpoint / "scaler.pt", weights_only=True)
    return state["scale"], state["_growth_tracker"]


def test_killed_fp16_run_resumes_exactly_with_its_grad_scaler(tmp_path):
    teacher = save_teacher(tmp_path, "test_convnext")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(launch(resume_flags(teacher, straight)))

    result = launch(resume_flags(teacher, killed), kill_after_step=2 * SAVE_STEPS)
    assert result.returncode != 0, "the run was not killed"
    interrupted = killed / f"checkpoint-{2 * SAVE_STEPS}"
    assert (interrupted / COMPLETE_MARKER).is_file() and (interrupted / "scaler.pt").is_file()
    assert not (killed / f"checkpoint-{3 * SAVE_STEPS}").exists()

    result = launch([*resume_flags(teacher, killed), "--resume", "--log_level", "info"])
    assert_ok(result)
    assert f"global step {2 * SAVE_STEPS}" in result.stdout + result.stderr

    final = f"checkpoint-{TOTAL_STEPS}"
    # The growth tracker counts the steps since the scale last changed: a resume that lost the scaler's
    # state would restart it from zero.
    assert scaler_state(killed / final) == scaler_state(straight / final)
    for name in ("model.safetensors", "ema.safetensors", "distiller_state_rank0.safetensors"):
        first, second = load_file(str(straight / final / name)), load_file(str(killed / final / name))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key} differs"
