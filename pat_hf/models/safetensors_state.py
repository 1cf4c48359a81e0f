"""What every safetensors writer of pat-hf saves: contiguous tensors, none sharing memory with another
(safetensors refuses both)."""

from __future__ import annotations

import torch


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
