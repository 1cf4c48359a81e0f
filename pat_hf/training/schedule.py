"""timm's optimizers and learning-rate schedules, driven by the Trainer the way the reference's train.py drives them.

The reference builds its scheduler with timm (`create_scheduler`) and calls `step(epoch + 1)` after every
epoch, so the rate is constant within an epoch: during epoch e it is the schedule's value at e
(docs/REFERENCE.md, Recipe).
The Trainer instead calls `lr_scheduler.step()` after every optimizer update; `TimmLRSchedule` turns those
calls back into timm's `step(epoch)` (once per epoch) or, with `--sched-on-updates`, `step_update(updates)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

# timm schedules that are a function of the epoch (or update) alone; plateau needs the eval metric and
# multistep a milestone list, neither of which the reference's configs use.


def create_timm_optimizer(model: torch.nn.Module, recipe: Any, lr: float,
                          weight_decay: float) -> torch.optim.Optimizer:
    """timm's optimizer for `recipe` (a RecipeArguments) over `model`'s trainable parameters, with the
    reference's weight-decay rule: none for parameters with ndim <= 1 or named `.bias`."""
    extra = {"eps": recipe.opt_eps} if recipe.opt_eps is not None else {}
    if recipe.opt_betas:
        extra["betas"] = tuple(recipe.opt_betas)
    return create_optimizer_v2(model, opt=recipe.opt, lr=lr, weight_decay=weight_decay, momentum=recipe.momentum,
                               **_multi_tensor_update(recipe.opt), **extra)


def _multi_tensor_update(opt: str) -> dict[str, bool]:
    """The multi-tensor (foreach) update wherever the optimizer has one: torch picks it by itself on CUDA only,
    and on the CPU it is faster than the per-parameter loop too, with bitwise equal updates. (torch's fused SGD
    is faster still, but fails on a step where a parameter gets its first gradient after others have momentum:
    PAT's fusion convolutions do, on the second step.)"""
    parameters = inspect.signature(get_optimizer_class(opt, bind_defaults=False)).parameters
    return {"foreach": True} if "foreach" in parameters else {}


def create_timm_scheduler(optimizer: torch.optim.Optimizer, recipe: Any, epochs: float,
                          updates_per_epoch: int) -> tuple[Scheduler, float]:
    """timm's scheduler for `recipe` (a RecipeArguments) over `epochs`, and the number of epochs to train
    (timm's count: the schedule plus `cooldown_epochs` for cyclic schedules, as the reference trains)."""
    return create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=epochs, decay_epochs=recipe.decay_epochs,
        decay_rate=recipe.decay_rate, cooldown_epochs=recipe.cooldown_epochs, min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr, warmup_epochs=recipe.warmup_epochs,
        step_on_epochs=not recipe.sched_on_updates, updates_per_epoch=updates_per_epoch)


def training_epochs(recipe: Any, epochs: float) -> float:
    """How many epochs the reference trains for `--epochs epochs` with this recipe."""
    placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return create_timm_scheduler(placeholder, recipe, epochs, updates_per_epoch=1)[1]


class TimmLRSchedule:
    """The Trainer's `lr_scheduler`: applies a timm scheduler's value for the current epoch (or update).

    `updates_done` returns the number of optimizer updates finished so far (the Trainer's global step, which
    counts updates that fp16 overflow skipped, as the reference's `num_updates` does)."""

    def __init__(self, scheduler: Scheduler, updates_per_epoch: int, updates_done: Callable[[], int]):
        if updates_per_epoch < 1:
            raise ValueError(f"updates_per_epoch must be positive, got {updates_per_epoch}")
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        self.updates_per_epoch = updates_per_epoch
        self.updates_done = updates_done
        self._apply(updates_done(), force=True)

    def _apply(self, updates: int, force: bool = False) -> None:
        if not self.scheduler.t_in_epochs:
            self.scheduler.step_update(updates)
        elif force or updates % self.updates_per_epoch == 0:
            self.scheduler.step(updates // self.updates_per_epoch)

    def step(self) -> None:
        # The Trainer steps the schedule right after the optimizer, before it counts that update.
        self._apply(self.updates_done() + 1)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A timm schedule is a function of the epoch (or update) alone, and its saved state is nothing but
        its settings: a resumed run keeps the schedule built from its own arguments, so that a longer --epochs
        continues exactly as a fresh run of that length (the saved t_initial would keep the old length)."""
        self._apply(self.updates_done(), force=True)
