"""Stopping at the first NaN or infinite loss, and at non-finite weights, before anything of it is saved.

`NonFiniteLossGuard` records, on the device and without reading anything back to the host, the first training
step whose loss components are not all finite, and their values; the trainer reads it (one small transfer)
at logging steps, before every checkpoint and at the end of training, and stops the run naming the step and
the component. With `--skip-nonfinite-steps N`, each step's loss is read instead (one host sync per step),
and up to N bad steps are passed over without an optimizer update (`SkippableOptimizerStep`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weight; nothing computed from it was saved."""

    # Its message names what to change: commands print it as it is (pat_hf/cli/failures.py).
    says_what_to_do = True


def loss_components(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scalar `loss*` outputs of a distiller step, the total `loss` last."""
    names = sorted(k for k in outputs if k.startswith("loss") and k != "loss")
    return {name: outputs[name] for name in [*names, "loss"] if name in outputs}


def describe_losses(values: Mapping[str, float]) -> str:
    """'loss_gt is nan (loss_kd 0.31, loss nan)': the first non-finite component, then all of them."""
    bad = next((name for name, value in values.items() if not math.isfinite(value)), "loss")
    return f"{bad} is {values[bad]} ({', '.join(f'{name} {value:.4g}' for name, value in values.items())})"


def loss_values(outputs: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """The names of a step's loss components and their values as one float tensor, on the device."""
    components = loss_components(outputs)
    return list(components), torch.stack([v.detach().float().reshape(()) for v in components.values()])


class NonFiniteLossGuard:
    """The first step with a non-finite loss component, kept on the device."""

    def __init__(self):
        self._names: list[str] | None = None
        self._step: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def observe(self, step: int, outputs: Mapping[str, torch.Tensor]) -> None:
        names, values = loss_values(outputs)
        if self._step is None:
            self._names = names
            self._step = torch.full((), -1, dtype=torch.long, device=values.device)
            self._values = torch.zeros_like(values)
        first = (~torch.isfinite(values)).any() & (self._step < 0)
        self._step = torch.where(first, torch.full_like(self._step, step), self._step)
        self._values = torch.where(first, values, self._values)

    def first_bad_step(self, accelerator: Accelerator) -> tuple[int, dict[str, float]] | None:
        """(step, loss values) of the earliest bad step on any process, or None. Every process must call this."""
        if self._step is None:
            return None
        steps = accelerator.gather(self._step.reshape(1)).tolist()
        values = accelerator.gather(self._values.reshape(1, -1)).tolist()
        bad = [(step, rank) for rank, step in enumerate(steps) if step >= 0]
        if not bad:
            return None
        step, rank = min(bad)
        return step, dict(zip(self._names, values[rank]))

    def raise_if_bad(self, accelerator: Accelerator, hint: str) -> None:
        found = self.first_bad_step(accelerator)
        if found is not None:
            step, values = found
            raise NonFiniteError(f"the training loss is not finite at step {step}: {describe_losses(values)}; "
                                 f"the run stopped and saved nothing from that step on. {hint}")


class NonFiniteStepSkipper:
    """--skip-nonfinite-steps N: a step whose loss is not finite on some process has its optimizer update
    skipped; the (N+1)-th such step stops the run. Reads the loss every step (one host sync)."""

    def __init__(self, optimizer: torch.optim.Optimizer, limit: int, learning_rate: float):
        self.optimizer_step = SkippableOptimizerStep(optimizer)
        self.limit = limit
        self.learning_rate = learning_rate
        self.skipped = 0

    def skips(self, step: int, outputs: Mapping[str, torch.Tensor], accelerator: Accelerator) -> bool:
        """Whether this step's update is skipped; raises NonFiniteError past the limit."""
        names, values = loss_values(outputs)
        if not accelerator.reduce((~torch.isfinite(values)).any().float(), reduction="sum").item():
            return False
        self.skipped += 1
        losses = describe_losses(dict(zip(names, values.tolist())))
        if self.skipped > self.limit:
            raise NonFiniteError(f"the training loss is not finite at step {step}: {losses}; that is more than "
                                 f"--skip-nonfinite-steps {self.limit} such steps, so the run stopped and saved "
                                 f"nothing from that step on. Lower --lr (now {self.learning_rate:g})")
        self.optimizer_step.skip_next = True
        logger.warning("step %d: %s; its update is skipped (%d of --skip-nonfinite-steps %d)", step, losses,
                       self.skipped, self.limit)
        return True


class SkippableOptimizerStep:
    """Lets the trainer skip the next `optimizer.step()` (a step with a non-finite loss leaves the weights,
    the moments and the weight decay untouched). The Trainer still counts the step and zeroes the gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip_next = False
        self._step = optimizer.step

        def step(*args, **kwargs):
            if self.skip_next:
                self.skip_next = False
                return None
            return self._step(*args, **kwargs)

        optimizer.step = step


def non_finite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an inf (one host sync)."""
    named = [(name, t) for name, t in state.items() if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    bad = non_finite_entries(state)
    if bad:
        raise NonFiniteError(f"{len(bad)} tensors of {what} hold NaN or inf values (e.g. {', '.join(bad[:3])}); "
                             f"nothing was saved")
