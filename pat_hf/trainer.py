"""`DistillationTrainer`: the HF Trainer running a distiller, with its loss components in the logs."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pat_hf.arguments import RecipeArguments
from pat_hf.distillers import Distiller

PROCESS_STATE_FILE = "distiller_state_rank{rank}.safetensors"


@contextlib.contextmanager
def _temporarily(obj, name: str, value):
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


class DistillationTrainer(Trainer):
    """Trains `model`, a `Distiller`: its forward is the whole distillation step, so DDP and autocast cover
    the student, the teacher and the distiller's modules alike. The loss it returns is a per-batch mean."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, recipe: RecipeArguments | None = None, mixup_fn: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe or RecipeArguments()
        self.mixup_fn = mixup_fn
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_steps = 0
        self._images_seen = 0
        self._last_log_time = time.perf_counter()

    @property
    def distiller(self) -> Distiller:
        return self.accelerator.unwrap_model(self.model)

    def create_optimizer(self, model=None):
        """timm's optimizer over the student and the distiller's modules, with the reference's weight-decay rule:
        none for parameters with ndim <= 1 or named `.bias` (the teacher is frozen, so it never enters)."""
        if self.optimizer is None:
            recipe = self.recipe
            extra = {"eps": recipe.opt_eps} if recipe.opt_eps is not None else {}
            if recipe.opt_betas:
                extra["betas"] = tuple(recipe.opt_betas)
            self.optimizer = create_optimizer_v2(self.distiller, opt=recipe.opt, lr=self.args.learning_rate,
                                                 weight_decay=self.args.weight_decay, momentum=recipe.momentum,
                                                 **extra)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            logits = model(pixel_values=inputs["pixel_values"])["logits"]
            loss = F.cross_entropy(logits.float(), inputs["labels"])
            return (loss, {"logits": logits}) if return_outputs else loss
        if self.mixup_fn is not None:
            inputs = dict(inputs)
            inputs["pixel_values"], inputs["labels"] = self.mixup_fn(inputs["pixel_values"], inputs["labels"])
        outputs = model(**inputs)
        self._accumulate_components(outputs, inputs["pixel_values"].shape[0])
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _accumulate_components(self, outputs: dict[str, torch.Tensor], batch_size: int) -> None:
        for key, value in outputs.items():
            if key.startswith("loss_"):
                total = self._component_sums.get(key)
                value = value.detach().float()
                self._component_sums[key] = value if total is None else total + value
        self._component_steps += 1
        self._images_seen += batch_size

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_steps:
            keys = sorted(self._component_sums)
            means = torch.stack([self._component_sums[k] for k in keys]) / self._component_steps
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({k: round(float(v), 6) for k, v in zip(keys, means)})
            images = self.accelerator.reduce(torch.tensor(float(self._images_seen), device=means.device), "sum")
            now = time.perf_counter()
            logs["train_images_per_second"] = round(float(images) / max(now - self._last_log_time, 1e-9), 2)
            self._component_sums, self._component_steps, self._images_seen = {}, 0, 0
            self._last_log_time = now
        super().log(logs, start_time)

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
        # drop_last is for training only (mixup pairs, PAT's feedback); evaluation must see every example.
        with _temporarily(self.args, "dataloader_drop_last", self.args.dataloader_drop_last and is_training):
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        state = self.distiller.process_state_dict()
        if state:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            path = os.path.join(folder, PROCESS_STATE_FILE.format(rank=self.args.process_index))
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROCESS_STATE_FILE.format(rank=self.args.process_index))
        self.distiller.load_process_state_dict(load_file(path) if os.path.isfile(path) else {})
