"""Projectors between feature shapes of different families (the reference's `get_projector_module`).

Four kinds, chosen by the two shapes: map -> map, tokens -> tokens, tokens -> map and map -> tokens.
Weights are initialised as the reference's `init_weights` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pat_hf.modules.patch_tokens import PatchTokens
from pat_hf.modules.shape_constants import shape_constant
from pat_hf.modules.token_grid import Shape, channels, is_map


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero norms, truncated-normal(0.02) linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _square_side(num_tokens: int) -> int:
    # Tokens meet maps here only at region attention's outputs, which lie on a square grid.
    return math.isqrt(num_tokens)


@shape_constant
def _nearest_repeats(in_size: tuple[int, int], out_size: tuple[int, int], dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """(H_in, W_in): how many pixels of a nearest resize to `out_size` copy each input pixel. Counted on the
    host (by resizing the pixel indices as F.interpolate does) and cached per device: no step copies it over."""
    index = torch.arange(in_size[0] * in_size[1], dtype=torch.float64).view(1, 1, *in_size)
    sources = F.interpolate(index, size=out_size, mode="nearest").long().flatten()
    # A scatter, not bincount: torch.compile cannot size bincount's output without reading its input.
    counts = torch.zeros(index.numel(), dtype=torch.float64).scatter_add_(0, sources, torch.ones(sources.shape,
                                                                                                 dtype=torch.float64))
    return counts.view(in_size).to(device, dtype)


def _batch_norm_of_resized(bn: nn.BatchNorm2d, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """bn(resize(x)) before the resize: in training, the batch statistics weigh each pixel of x by how often the
    nearest resize copies it, and the running variance is unbiased over the resized count, as bn would see it."""
    if not bn.training and bn.running_mean is not None:
        return bn(x)  # running statistics: a per-channel affine map, which commutes with the resize
    # Statistics in at least fp32, as batch_norm keeps them under autocast.
    with torch.autocast(x.device.type, enabled=False):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        weight = _nearest_repeats(tuple(x.shape[-2:]), out_size, x32.dtype, x.device)
        count = x.shape[0] * out_size[0] * out_size[1]
        mean = torch.einsum("bchw,hw->c", x32, weight) / count
        centred = x32 - mean[:, None, None]
        var = torch.einsum("bchw,hw->c", centred.square(), weight) / count
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean.detach(), var.detach() * (count / max(count - 1, 1)))
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            return centred * (bn.weight * scale)[:, None, None] + bn.bias[:, None, None]
        return centred * scale[:, None, None]


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """As batch_norm updates them, without reading the batch count back to the host."""
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    bn.running_var.lerp_(unbiased_var.to(bn.running_var.dtype), factor)


class MapToMap(nn.Module):
    """Nearest resize to the target's height and width, BatchNorm, 1x1 conv.

    Both act per pixel, so a map that grows is normalised and projected first and resized last: the same
    result at the input's resolution, with the resize copying the (usually fewer) output channels."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        self.out_size = tuple(out_shape[-2:])
        self.proj = nn.Sequential(nn.BatchNorm2d(channels(in_shape)),
                                  nn.Conv2d(channels(in_shape), channels(out_shape), 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_size = tuple(x.shape[-2:])
        if in_size == self.out_size:
            return self.proj(x)
        if math.prod(in_size) >= math.prod(self.out_size):
            return self.proj(F.interpolate(x, size=self.out_size, mode="nearest"))
        norm, conv = self.proj
        projected = conv(_batch_norm_of_resized(norm, x, self.out_size))
        return F.interpolate(projected, size=self.out_size, mode="nearest")


class TokensToTokens(nn.Module):
    """A learned channel projection followed by a learned token-count projection."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        (in_tokens, in_dim), (out_tokens, out_dim) = in_shape, out_shape
        self.channel_proj = nn.Sequential(nn.BatchNorm1d(in_tokens), nn.Linear(in_dim, out_dim))
        self.token_proj = nn.Sequential(nn.BatchNorm1d(out_dim), nn.Linear(in_tokens, out_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_proj(x)
        x = self.token_proj(rearrange(x, "b l c -> b c l"))
        return rearrange(x, "b c l -> b l c")


class TokensToMap(MapToMap):
    """Tokens laid out on their square grid, then as MapToMap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(rearrange(x, "b (h w) c -> b c h w", h=_square_side(x.shape[1])))


class MapToTokens(nn.Module):
    """Nearest upsample if needed, then a patch-embedding conv onto the target token grid."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        self.proj = PatchTokens(channels(in_shape), channels(out_shape), in_shape[-2:], _square_side(out_shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_projector(in_shape: Shape, out_shape: Shape) -> nn.Module:
    kinds = {(True, True): MapToMap, (False, False): TokensToTokens,
             (False, True): TokensToMap, (True, False): MapToTokens}
    projector = kinds[is_map(in_shape), is_map(out_shape)](in_shape, out_shape)
    init_weights(projector)
    return projector
