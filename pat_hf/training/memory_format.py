"""--channels-last in one place: models and training/evaluation images in channels-last memory, everything
written to disk contiguous (safetensors stores contiguous tensors only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MemoryFormat:
    channels_last: bool = False

    def apply(self, module: nn.Module) -> nn.Module:
        """The module in the run's memory format (in place)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def saveable_state(self, module: nn.Module,
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The state a writer should save for `module`: `state_dict` as given (None: the writer's own) in
        contiguous memory, contiguous copies of the module's state with channels-last."""
        if not self.channels_last:
            return state_dict
        state = state_dict if state_dict is not None else module.state_dict()
        return {k: v.contiguous() for k, v in state.items()}

    def for_export(self, module: nn.Module) -> nn.Module:
        """The module back in contiguous memory (in place), for writers that take a module."""
        return module.to(memory_format=torch.contiguous_format) if self.channels_last else module
