"""--channels-last in one place: models and training/evaluation images in channels-last memory, and saved state
back in the contiguous memory safetensors needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pat_hf.models.safetensors_state import safetensors_ready


@dataclass(frozen=True)
class MemoryFormat:
    channels_last: bool = False

    def apply(self, module: nn.Module) -> nn.Module:
        """The module in the run's memory format (in place)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def saveable_state(self, module: nn.Module,
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The state a writer should save for `module` (`state_dict`, or the module's own): `safetensors_ready`."""
        return safetensors_ready(state_dict if state_dict is not None else module.state_dict())

    def for_export(self, module: nn.Module) -> nn.Module:
        """The module back in contiguous memory (in place), for writers that take a module."""
        return module.to(memory_format=torch.contiguous_format) if self.channels_last else module
