"""Exporting the distilled student in timm's Hub format: `config.json`, `model.safetensors`, the model card and
`training_curves.png`, written under a `.partial` name and published complete. It loads with
`timm.create_model("local-dir:DIR", pretrained=True)`, transformers' `AutoModelForImageClassification` and
`pipeline("image-classification", model=DIR)`, all with the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, save_config_for_hf
from torch import nn

from pat_hf.export.card import ModelCardInfo, model_card
from pat_hf.export.curves import TRAINING_CURVES_FILE, write_training_curves
from pat_hf.models.safetensors_state import safetensors_ready
from pat_hf.training.atomic import (
    cleaned_up_on_failure,
    partial_path,
    publish_folder,
    write_failure_reason,
    write_text_atomically,
)
from pat_hf.training.checkpoints import latest_complete_checkpoint
from pat_hf.training.nonfinite import check_finite_state


def _clean_config(config: dict[str, Any], pretrained: bool) -> dict[str, Any]:
    config.get("model_args", {}).pop("num_classes", None)
    if not pretrained:
        # timm's default pretrained tag (e.g. `r160_in1k`) and its license describe weights this student never had.
        for key in ("tag", "license"):
            config.get("pretrained_cfg", {}).pop(key, None)
    return config


def export_student(student: nn.Module, directory: str | Path, *, model_kwargs: dict[str, Any],
                   data_config: dict[str, Any], class_names: list[str] | None, card: ModelCardInfo,
                   pretrained: bool = False, summary_csv: str | Path | None = None) -> Path:
    """Write the student alone in timm's Hub format, its model card and its training curves (from the run's
    summary.csv); the folder appears complete or not at all."""
    directory = Path(directory)
    staging = partial_path(directory)
    shutil.rmtree(staging, ignore_errors=True)
    model_config = {"label_names": class_names} if class_names else None
    # transformers' TimmWrapper passes num_classes itself: a second copy in model_args makes it fail.
    model_args = {k: v for k, v in model_kwargs.items() if k != "num_classes"}
    with cleaned_up_on_failure(staging):  # a full disk leaves no half-written export behind
        # timm's save_for_hf, but with a state that safetensors accepts from every timm model (it passes the
        # state dict as it is, so a module held under two names makes it fail).
        staging.mkdir(parents=True)
        safetensors.torch.save_file(safetensors_ready(student.state_dict()), staging / HF_SAFE_WEIGHTS_NAME)
        save_config_for_hf(student, staging / "config.json", model_config=model_config, model_args=model_args,
                           data_config={k: data_config[k] for k in ("input_size", "interpolation", "mean", "std",
                                                                    "crop_pct")})
        config_path = staging / "config.json"
        config_path.write_text(json.dumps(_clean_config(json.loads(config_path.read_text()), pretrained), indent=2))
        model_name = directory.resolve().parent.name
        curves = summary_csv and write_training_curves(summary_csv, staging / TRAINING_CURVES_FILE,
                                                       title=f"{model_name}: {card.distiller}")
        model_card(card, model_name, str(directory.resolve()), local=True, with_curves=bool(curves)).save(
            staging / "README.md")
        publish_folder(staging, directory)
    return directory


def export_trained_student(student: nn.Module, directory: str, **export_options: Any) -> None:
    """`export_student` at the end of a run: the student is checked finite first, and a failed write is one line
    naming the folder (nothing of it is kept; the checkpoints are intact, so --resume exports again), whichever
    library's error type reports it."""
    check_finite_state(student.state_dict(), "the student")
    try:
        export_student(student, directory, **export_options)
    except Exception as error:
        reason = write_failure_reason(error)
        if reason is None:
            raise
        if latest_complete_checkpoint(Path(directory).parent) is None:
            raise OSError(f"could not write the student to {directory}: {reason}; nothing of it was kept and the "
                          f"run saved no checkpoint to export it from: free space (or restore write access) and "
                          f"start it again with --overwrite_output_dir") from error
        raise OSError(f"could not write the student to {directory}: {reason}; nothing of it was kept and the "
                      f"checkpoints are intact: free space (or restore write access) and export it with "
                      f"--resume") from error


def rewrite_card(directory: str | Path, card: ModelCardInfo) -> None:
    """The exported folder's model card again, once facts measured on its files (cost, ONNX) were added."""
    directory = Path(directory)
    model_name = directory.resolve().parent.name
    text = model_card(card, model_name, str(directory.resolve()), local=True,
                      with_curves=(directory / TRAINING_CURVES_FILE).is_file())
    write_text_atomically(directory / "README.md", str(text))
