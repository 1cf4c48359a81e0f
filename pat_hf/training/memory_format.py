"""--channels-last in one place: models and training/evaluation images in channels-last memory; and what every
safetensors writer of pat-hf saves: contiguous tensors, none sharing memory with another (safetensors refuses both)."""

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
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The state a writer should save for `module` (`state_dict`, or the module's own): `safetensors_ready`."""
        return safetensors_ready(state_dict if state_dict is not None else module.state_dict())

    def for_export(self, module: nn.Module) -> nn.Module:
        """The module back in contiguous memory (in place), for writers that take a module."""
        return module.to(memory_format=torch.contiguous_format) if self.channels_last else module


def safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as safetensors stores it: each tensor contiguous (a copy where it is not, e.g. channels-last) and
    in memory of its own. A timm model may hold one module under two names (CoaT's convolutional position
    encodings): each later name gets a copy, so that every name keeps its entry and any loader, timm's strict
    one included, finds them all; loading sets the shared module twice to the same values."""
    ready, seen = {}, set()
    for name, tensor in state.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        shared = storage is not None and storage in seen
        seen.add(storage)
        ready[name] = tensor.contiguous().clone() if shared else tensor.contiguous()
    return ready
