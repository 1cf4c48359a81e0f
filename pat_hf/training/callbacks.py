"""Trainer callbacks: the student's exponential moving average (timm's ModelEmaV3), as the reference keeps it,
and switching mixup off at --mixup-off-epoch.

Callbacks that derive from `CheckpointStateCallback` have their state written into every checkpoint and read
back on resume by `DistillationTrainer`, before the checkpoint is marked complete (transformers' own callback
state export only round-trips JSON, not tensors).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class CheckpointStateCallback(TrainerCallback):
    """A callback whose state travels with the Trainer's checkpoints."""

    def save_to_checkpoint(self, folder: str, is_main_process: bool) -> None:
        raise NotImplementedError

    def load_from_checkpoint(self, folder: str) -> None:
        raise NotImplementedError


def ema_name(index: int) -> str:
    """Name of the index-th EMA in metric keys and files: ema, ema1, ema2, ..."""
    return "ema" if index == 0 else f"ema{index}"


class ModelEmaCallback(CheckpointStateCallback):
    """One EMA of the student per decay, updated after every optimizer step with a fixed decay and no warm-up
    (the reference's ModelEmaV2 use, docs/REFERENCE.md, Recipe). Each is saved as `<name>.safetensors` in every
    checkpoint."""

    def __init__(self, student: nn.Module, decays: Sequence[float]):
        if not decays:
            raise ValueError("ModelEmaCallback needs at least one decay")
        self.student = student
        self.decays = list(decays)
        self._emas: list[ModelEmaV3] | None = None

    def build(self) -> list[ModelEmaV3]:
        """The EMAs, copied from the student on first use: by then the Trainer has put the student on its
        device, so the copies live beside it; a resume loads them right after."""
        if self._emas is None:
            self._emas = [ModelEmaV3(self.student, decay=decay) for decay in self.decays]
        return self._emas

    def named_models(self) -> list[tuple[str, nn.Module]]:
        return [(ema_name(i), ema.module) for i, ema in enumerate(self.build())]

    def on_train_begin(self, args, state, control, **kwargs):
        self.build()

    def on_step_end(self, args, state, control, **kwargs):
        for ema in self.build():
            ema.update(self.student)

    def save_to_checkpoint(self, folder: str, is_main_process: bool) -> None:
        if not is_main_process:
            return
        for name, module in self.named_models():
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(state, os.path.join(folder, f"{name}.safetensors"))

    def load_from_checkpoint(self, folder: str) -> None:
        for name, module in self.named_models():
            path = os.path.join(folder, f"{name}.safetensors")
            if not os.path.isfile(path):
                logger.warning("%s has no %s.safetensors (saved without this --model-ema-decay): that EMA starts "
                               "from the resumed student", folder, name)
                module.load_state_dict(self.student.state_dict())
                continue
            with torch.no_grad():
                module.load_state_dict(load_file(path, device=str(next(module.parameters()).device)))


class MixupOffCallback(TrainerCallback):
    """--mixup-off-epoch: from that epoch on, batches keep timm's (smoothed one-hot) labels but are not mixed."""

    def __init__(self, mixup: Mixup, off_epoch: int):
        self.mixup = mixup
        self.off_epoch = off_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The flag lives in shared memory (pat_hf.data.SharedSwitchMixup): persistent data workers see it too.
        self.mixup.mixup_enabled = (state.epoch or 0) < self.off_epoch
