"""Small pieces shared by the end-to-end tests: a tiny teacher checkpoint and the flags of a tiny run."""

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

STUDENT = ["--model", "test_vit", "--model-kwargs", '{"img_size": 32, "patch_size": 4}', "--img-size", "32"]


def save_teacher(directory: Path, name: str = "test_resnet", num_classes: int = 10) -> str:
    """A random-init teacher, the same whatever ran before (its features set the targets of the tests)."""
    path = directory / f"{name}_teacher.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(name, num_classes=num_classes).state_dict(), str(path))
    return str(path)


def tiny_run(output_dir: Path, teacher: str | None, *extra: str, samples: int = 64) -> list[str]:
    """Flags of a few-step run on the digits data (offline), small enough for a 2-core CI machine."""
    teacher_flags = ["--teacher", "test_resnet", "--teacher-pretrained", teacher] if teacher else ["--teacher", ""]
    return [*STUDENT, *teacher_flags, "--dataset", "digits", "--max-train-samples", str(samples),
            "--max-eval-samples", "32", "--batch-size", "16", "--epochs", "1", "--lr", "0.001", "--opt", "adamw",
            "--smoothing", "0", "--output_dir", str(output_dir), "--report_to", "none", "--logging_steps", "2",
            "--disable_tqdm", "true", *extra]
