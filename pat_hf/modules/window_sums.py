"""The spatial mean of a pointwise conv followed by a window conv, without the full-size maps.

mean_hw(window(pointwise(x))) is linear in x: each tap of the window kernel reads the input over one rectangle
(zero padding reads nothing outside it), so the mean needs only the sums of x over the k x k rectangles the taps
read. PAT's gate-only excitation (docs/REFERENCE.md, Quirks) makes its prompt branches depend on x through
exactly this mean, which costs a few sums over x instead of a dense k x k convolution at full resolution.
What follows the mean acts on (B, C) vectors, where a convolution is a (grouped) matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pat_hf.modules.shape_constants import shape_constant


def _tap_ranges(size: int, kernel: int, padding: int) -> list[tuple[int, int]]:
    """For each kernel tap along one axis, the input range [start, stop) that the tap reads."""
    out = size + 2 * padding - kernel + 1
    ranges = [(max(0, tap - padding), min(size, tap - padding + out)) for tap in range(kernel)]
    return [(start, max(start, stop)) for start, stop in ranges]


@shape_constant
def _tap_indicator(size: int, kernel: int, padding: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(kernel, size): 1 where a tap reads an input position along one axis; cached per device."""
    indicator = torch.zeros(kernel, size, dtype=dtype)
    for tap, (start, stop) in enumerate(_tap_ranges(size, kernel, padding)):
        indicator[tap, start:stop] = 1
    return indicator.to(device)


def tap_sums(x: torch.Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """(B, C, kh, kw): for each tap of a stride-1 kernel, the sum of x over the pixels that tap reads (two matmuls
    with the taps' 0/1 row and column indicators: a few operations, whatever the kernel size)."""
    rows = _tap_indicator(x.shape[-2], kernel_size[0], padding[0], x.dtype, x.device)
    cols = _tap_indicator(x.shape[-1], kernel_size[1], padding[1], x.dtype, x.device)
    return torch.einsum("ih,bchw,jw->bcij", rows, x, cols)


def _tap_counts(x: torch.Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """(kh, kw): how many pixels each tap reads."""
    rows = _tap_indicator(x.shape[-2], kernel_size[0], padding[0], x.dtype, x.device).sum(dim=1)
    cols = _tap_indicator(x.shape[-1], kernel_size[1], padding[1], x.dtype, x.device).sum(dim=1)
    return rows[:, None] * cols[None, :]


def _check_window(conv: nn.Conv2d, pointwise: bool) -> None:
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or \
            isinstance(conv.padding, str) or (pointwise and (conv.kernel_size != (1, 1) or conv.padding != (0, 0))):
        raise ValueError(f"window sums need stride-1, undilated, zero-padded convolutions, got {conv}")


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., groups * I) @ a grouped (groups * O, I) weight -> (..., groups * O), as a grouped conv mixes channels."""
    if groups == 1:
        return F.linear(x, weight)
    out = torch.einsum("...gi,goi->...go", rearrange(x, "... (g i) -> ... g i", g=groups),
                       rearrange(weight, "(g o) i -> g o i", g=groups))
    return rearrange(out, "... g o -> ... (g o)")


def pointwise_on_vectors(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to (..., C) vectors: conv(x viewed as 1x1 maps), without a convolution call."""
    _check_window(conv, pointwise=True)
    out = grouped_linear(x, conv.weight.flatten(1), conv.groups)
    return out if conv.bias is None else out + conv.bias


def mean_of_pointwise_then_window(x: torch.Tensor, pointwise: nn.Conv2d, window: nn.Conv2d) -> torch.Tensor:
    """(B, C_out) equal to window(pointwise(x)).mean((2, 3))."""
    _check_window(window, pointwise=False)
    padding, kernel = window.padding, window.kernel_size
    per_tap = pointwise_on_vectors(pointwise, rearrange(tap_sums(x, kernel, padding), "b c h w -> b h w c"))
    if pointwise.bias is not None:
        # The bias is added once per pixel a tap reads, not once per tap.
        counts = _tap_counts(x, kernel, padding)
        per_tap = per_tap + pointwise.bias * (counts[..., None] - 1)
    out_pixels = (x.shape[-2] + 2 * padding[0] - kernel[0] + 1) * (x.shape[-1] + 2 * padding[1] - kernel[1] + 1)
    summed = grouped_linear(rearrange(per_tap, "b h w c -> b (c h w)"), window.weight.flatten(1), window.groups)
    mean = summed / out_pixels
    return mean if window.bias is None else mean + window.bias
