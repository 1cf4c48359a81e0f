"""The student's exponential moving averages: kept by a callback (timm's ModelEmaV3), as the reference keeps
them, and evaluated next to the raw student, with the best metric taken over them all."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from torch import nn
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import EvalLoopOutput

from pat_hf.models.safetensors_state import safetensors_ready
from pat_hf.training.attributes import temporarily
from pat_hf.training.checkpoints import CheckpointStateCallback

logger = logging.getLogger(__name__)


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
            state = safetensors_ready({k: v.detach().cpu() for k, v in module.state_dict().items()})
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


class EmaEvaluation:
    """The trainer's evaluation: the raw student, then each EMA student of the run's `ModelEmaCallback` in its
    place (metrics `<prefix>_ema_top1`, ...), and the higher top-1 of them as `<prefix>_max_top1`, the
    reference's selection metric. `epoch_metrics` keeps the epoch's latest `eval` metrics for its summary row."""

    def __init__(self, callback_handler: CallbackHandler):
        # The handler, not its callbacks now: a callback may be added after the trainer is built.
        self.callback_handler = callback_handler
        self.epoch_metrics: dict[str, float] = {}

    @property
    def ema_callback(self) -> ModelEmaCallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, ModelEmaCallback)), None)

    def start_epoch(self) -> None:
        self.epoch_metrics = {}

    def evaluation_loop(self, run_loop: Callable[[str, str], EvalLoopOutput], distiller: nn.Module,
                        description: str, metric_key_prefix: str) -> EvalLoopOutput:
        """Run `run_loop(description, metric_key_prefix)` (the Trainer's evaluation loop) for the raw student
        and for each EMA student put in the `distiller`'s `student` place."""
        output = run_loop(description, metric_key_prefix)
        top1 = [output.metrics.get(f"{metric_key_prefix}_top1")]
        for name, module in self.ema_callback.named_models() if self.ema_callback else []:
            prefix = f"{metric_key_prefix}_{name}"
            with temporarily(distiller, "student", module):
                ema_output = run_loop(f"{description} ({name})", prefix)
            output.metrics.update(ema_output.metrics)
            top1.append(ema_output.metrics.get(f"{prefix}_top1"))
        top1 = [value for value in top1 if value is not None]
        if top1:
            output.metrics[f"{metric_key_prefix}_max_top1"] = max(top1)
        if metric_key_prefix == "eval":
            self.epoch_metrics = dict(output.metrics)
        return output
