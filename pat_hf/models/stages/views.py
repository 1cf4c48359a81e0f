"""Showing stage tensors in the canonical layouts: NCHW maps or (B, L, C) tokens with their prefix tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pat_hf.models.stages.plan import TensorPath, TensorView, tensors_in


def model_layout(model: nn.Module) -> str:
    return "NHWC" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "NCHW"


def on_image_grid(height: int, width: int, input_size) -> bool:
    """Whether a height x width grid has the image's shape (up to rounding)."""
    image_height, image_width = input_size[-2:]
    return abs(height * image_width - width * image_height) <= max(image_height, image_width)


def layout_of(x: torch.Tensor, channels: tuple[int, ...], preferred: str, input_size,
               reordered: bool = False) -> str | None:
    """The layout of `x` in which it has one of the expected widths (any, if none is expected) and, for a 4-D
    tensor, a grid of the image's shape (unless a token-order rule puts its positions elsewhere); the preferred
    one if both 4-D layouts fit; None if none does."""
    if x.ndim == 3:
        return "NLC" if not channels or x.shape[-1] in channels else None
    readings = (("NCHW", x.shape[1], x.shape[2:]), ("NHWC", x.shape[-1], x.shape[1:3]))
    fitting = [layout for layout, width, grid in readings
               if (not channels or width in channels) and (reordered or on_image_grid(*grid, input_size))]
    if len(fitting) == 2:
        return "NHWC" if preferred == "NHWC" else "NCHW"
    return fitting[0] if fitting else None


@dataclass(frozen=True)
class ProbedTensor:
    """A tensor seen at a hook: which one of the hooked object, in which layout."""

    path: TensorPath
    layout: str
    shape: tuple[int, ...]


def positions_of(x: torch.Tensor, layout: str) -> int:
    return x.shape[1] if layout == "NLC" else math.prod(x.shape[2:] if layout == "NCHW" else x.shape[1:3])


def probe_tensor(raw: Any, channels: tuple[int, ...], preferred: str, input_size,
                  reordered: bool = False) -> ProbedTensor | None:
    """The stage tensor among those of an output or argument tuple: of the expected width, the one with the most
    positions (PiT's feature map rather than its class token), the preferred layout on ties."""
    rank = {"NCHW": ("NCHW", "NLC", "NHWC"), "NHWC": ("NHWC", "NLC", "NCHW"),
            "NLC": ("NLC", "NCHW", "NHWC")}[preferred]
    candidates = list(tensors_in(raw))
    matches = [(path, x, layout) for path, x in candidates
               if (layout := layout_of(x, channels, preferred, input_size, reordered))]
    if not matches and len(candidates) == 1 and channels:
        # feature_info's width is not always the tensor's (HRNet's incre modules); a lone tensor is it.
        path, x = candidates[0]
        layout = layout_of(x, (), preferred, input_size, reordered)
        matches = [(path, x, layout)] if layout else []
    if not matches:
        return None
    path, x, layout = max(matches, key=lambda m: (positions_of(m[1], m[2]), -rank.index(m[2])))
    return ProbedTensor(path, layout, tuple(x.shape[1:]))


def probe_channels(probe: ProbedTensor) -> int:
    return probe.shape[0] if probe.layout == "NCHW" else probe.shape[-1]


Reductions = tuple[float, ...]  # where a tensor may be: its stage's reduction, or the previous stage's


def _reduction_grid(count: int, input_size, reductions: Reductions) -> tuple[int, int] | None:
    """(rows, columns) of `count` patch tokens if one of the reductions gives that many."""
    height, width = input_size[-2:]
    for reduction in filter(None, reductions):
        for rows in (height // round(reduction), math.ceil(height / reduction)):
            for columns in (width // round(reduction), math.ceil(width / reduction)):
                if rows * columns == count:
                    return rows, columns
    return None


def _aspect_grid(count: int, input_size) -> tuple[int, int] | None:
    """(rows, columns) of `count` patch tokens on a grid of the image's aspect ratio."""
    height, width = input_size[-2:]
    rows = max(1, round(math.sqrt(count * height / width)))
    return (rows, count // rows) if count and rows * (count // rows) == count else None


def _token_grid(count: int, input_size, reductions: Reductions) -> tuple[int, int] | None:
    return _reduction_grid(count, input_size, reductions) or _aspect_grid(count, input_size)


MAX_PREFIX_TOKENS = 16


def prefix_count(tokens: int, model: nn.Module, input_size, reductions: Reductions) -> int:
    """How many leading tokens are not patch tokens: as many as leave the reduction's grid (the model's
    declared prefix tokens first, then none: CaiT, XCiT and ConViT add their class token late; then any few:
    CoaT and PiT declare none), else as many as leave a grid of the image's shape."""
    declared = int(getattr(model, "num_prefix_tokens", 0) or 0)
    candidates = list(dict.fromkeys([declared, 0, *range(1, MAX_PREFIX_TOKENS + 1)]))
    for prefix in candidates:
        if tokens > prefix and _reduction_grid(tokens - prefix, input_size, reductions):
            return prefix
    for prefix in candidates[:2]:
        if tokens > prefix and _aspect_grid(tokens - prefix, input_size):
            return prefix
    return declared if tokens > declared else 0


@dataclass
class SeenTensor:
    probe: ProbedTensor
    prefix: int = 0
    order: torch.Tensor | None = None


def see_tensor(model: nn.Module, raw: Any, channels: tuple[int, ...], preferred: str, input_size,
         reductions: Reductions, order: torch.Tensor | None, what: str, first_if_unmatched: bool = False) -> SeenTensor:
    if raw is None:
        raise ValueError(f"{what} of {type(model).__name__} does not run exactly once with a positional input")
    reordered = order is not None
    probe = probe_tensor(raw, channels, preferred, input_size, reordered)
    if probe is None and first_if_unmatched:
        # An input of a width no feature_info entry names (the stem's): the widest tensor argument it is.
        probe = probe_tensor(raw, (), preferred, input_size, reordered)
    if probe is None:
        raise ValueError(f"{what} of {type(model).__name__} gives no (B, C, H, W), (B, H, W, C) or (B, L, C) tensor")
    prefix = prefix_count(probe.shape[0], model, input_size, reductions) if probe.layout == "NLC" else 0
    return SeenTensor(probe, prefix, order)


def tensor_view(seen: SeenTensor, as_map: bool, shown_prefix: int, input_size, reductions: Reductions, what: str) \
        -> TensorView:
    probe = seen.probe
    if probe.layout == "NCHW":
        return TensorView("NCHW", True, probe.path)
    if probe.layout == "NHWC":
        # Reordered NHWC tensors are not on their image grid (NesT's image blocks x tokens per block).
        grid = probe.shape[:2] if seen.order is None else _token_grid(math.prod(probe.shape[:2]), input_size,
                                                                      reductions)
        hidden, prefix = 0, 0
    else:
        hidden, prefix = (seen.prefix, 0) if as_map else (seen.prefix - shown_prefix, shown_prefix)
        grid = _token_grid(probe.shape[0] - seen.prefix, input_size, reductions) if as_map else None
        if as_map and grid is None:
            raise ValueError(f"the {probe.shape[0] - seen.prefix} tokens of {what} do not form a grid")
    return TensorView(probe.layout, as_map, probe.path, hidden, prefix, tuple(grid) if grid else None, seen.order)
