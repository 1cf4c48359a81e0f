"""What the stage layer decides for a model: the four stages' modules and how each tensor is viewed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

NUM_STAGES = 4
ISOTROPIC_STAGE_FRACTIONS = (2 / 12, 4 / 12, 10 / 12, 12 / 12)
# Plan-time forwards use two samples, so that a tensor whose first dimension is not the batch (TNT's pixel
# tokens, batch x patches) is never taken for a stage.
PROBE_BATCH = 2

PromptFn = Callable[[torch.Tensor], torch.Tensor]
TensorPath = tuple[int, ...]  # indices into nested tuples/lists: () is the object itself


@dataclass(frozen=True)
class FeatureEntry:
    """One `feature_info` entry: where a forward hook reads it, where its stage would start."""

    module: str
    reduction: float
    channels: int | None = None
    start: str | None = None  # where the entry's own blocks start (its first child for a block list)


@dataclass(frozen=True)
class TensorView:
    """How one hooked tensor (a module output, or a positional input) is shown in the canonical layout."""

    layout: str  # the model's own layout: "NCHW", "NHWC" or "NLC"
    as_map: bool  # canonical (B, C, H, W) rather than (B, L, C)
    path: TensorPath = ()  # where the tensor sits in the output, or in the positional arguments
    hidden_tokens: int = 0  # leading tokens not shown (prefix tokens a map or another stage lacks)
    prefix_tokens: int = 0  # leading tokens shown as prefix tokens
    grid: tuple[int, int] | None = None  # (rows, columns) of the tokens, for tokens shown as a map
    order: torch.Tensor | None = field(default=None, compare=False)  # row-major position -> own token index

    def to_canonical(self, raw: Any) -> torch.Tensor:
        x = tensor_at(raw, self.path)
        if self.layout == "NCHW":
            return x
        tokens = rearrange(x, "b h w c -> b (h w) c") if self.layout == "NHWC" else x
        start = self.hidden_tokens + self.prefix_tokens
        prefix, patches = tokens[:, self.hidden_tokens:start], tokens[:, start:]
        if self.order is not None:
            patches = patches[:, self.order.to(patches.device)]
        if self.as_map:
            return rearrange(patches, "b (h w) c -> b c h w", h=self.grid[0])
        return torch.cat([prefix, patches], dim=1) if self.prefix_tokens else patches

    def from_canonical(self, new: torch.Tensor, raw: Any) -> Any:
        """`raw` with the viewed tensor replaced by the canonical `new`."""
        x = tensor_at(raw, self.path)
        if self.layout == "NCHW":
            return with_tensor_at(raw, self.path, new)
        own = rearrange(x, "b h w c -> b (h w) c") if self.layout == "NHWC" else x
        if self.as_map:
            prefix, patches = own[:, :0], rearrange(new, "b c h w -> b (h w) c")
        else:
            prefix, patches = new[:, :self.prefix_tokens], new[:, self.prefix_tokens:]
        if self.order is not None:
            patches = patches[:, torch.argsort(self.order).to(patches.device)]
        tokens = torch.cat([own[:, :self.hidden_tokens], prefix, patches], dim=1)
        if self.layout == "NHWC":
            tokens = rearrange(tokens, "b (h w) c -> b h w c", h=x.shape[1])
        return with_tensor_at(raw, self.path, tokens)


@dataclass(frozen=True)
class StagePlan:
    """Where the four stages of a model start and end, and how their tensors are shown."""

    ends: tuple[str, ...]
    starts: tuple[str, ...]
    outputs: tuple[TensorView, ...]
    inputs: tuple[TensorView, ...]
    num_prefix_tokens: int = 0

    @property
    def is_sequence(self) -> bool:
        return not self.outputs[0].as_map


@dataclass
class StageOutput:
    stages: list[torch.Tensor]
    pooled: torch.Tensor
    logits: torch.Tensor


def tensor_at(raw: Any, path: TensorPath) -> Any:
    for index in path:
        raw = raw[index]
    return raw


def with_tensor_at(raw: Any, path: TensorPath, value: Any) -> Any:
    if not path:
        return value
    items = list(raw)
    items[path[0]] = with_tensor_at(items[path[0]], path[1:], value)
    return tuple(items) if isinstance(raw, tuple) else items


def tensors_in(raw: Any, path: TensorPath = ()) -> Iterator[tuple[TensorPath, torch.Tensor]]:
    """Every batch-first tensor in a (nested) output or argument tuple, depth first."""
    if isinstance(raw, torch.Tensor):
        if raw.ndim in (3, 4) and raw.shape[0] == PROBE_BATCH:
            yield path, raw
    elif isinstance(raw, (tuple, list)):
        for index, item in enumerate(raw):
            yield from tensors_in(item, (*path, index))
