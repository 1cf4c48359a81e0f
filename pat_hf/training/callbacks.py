"""Switching mixup off at --mixup-off-epoch. (The student's EMA callback lives in training/ema.py; callbacks
whose state travels with checkpoints derive from `training.checkpoints.CheckpointStateCallback`.)"""

from __future__ import annotations

from timm.data import Mixup
from transformers import TrainerCallback


class MixupOffCallback(TrainerCallback):
    """--mixup-off-epoch: from that epoch on, batches keep timm's (smoothed one-hot) labels but are not mixed."""

    def __init__(self, mixup: Mixup, off_epoch: int):
        self.mixup = mixup
        self.off_epoch = off_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The flag lives in shared memory (data/transforms.py, SharedSwitchMixup): persistent data workers see it.
        self.mixup.mixup_enabled = (state.epoch or 0) < self.off_epoch
