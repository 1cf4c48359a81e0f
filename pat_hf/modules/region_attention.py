"""PAT's region-aware attention (RAA): self-attention over a few patch tokens from each student stage.

Every student stage is patch-embedded onto a small square grid of tokens (n = num_queries / 4 per stage); the
4n tokens attend to each other (queries, keys and values all from the student, no residual, no output
projection) and come back split by stage. `batch_indexed_position` is the reference's quirk of adding the
positional-encoding row of the sample's place in the batch instead of one row per token (docs/REFERENCE.md,
Quirks); how a token stage is laid on its grid comes with the stage's `FeatureGrid`.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from pat_hf.modules.patch_tokens import PatchTokens
from pat_hf.modules.token_grid import FeatureGrid

NUM_STAGES = 4
NUM_HEADS = 8


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, 1, dim): sin at even, cos at odd channels."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.unsqueeze(1)


def check_region_attention(num_queries: int, dim: int, heads: int = NUM_HEADS) -> None:
    """The sizes region attention can be built with (`--pat-raa-num-queries`, `--pat-raa-dim`)."""
    tokens_per_stage = num_queries // NUM_STAGES
    if num_queries % NUM_STAGES or math.isqrt(tokens_per_stage) ** 2 != tokens_per_stage:
        raise ValueError(f"--pat-raa-num-queries must be 4*k*k (16, 36, 64, 100, 144, ...), got {num_queries}")
    if dim % heads or dim % 2:
        raise ValueError(f"--pat-raa-dim must be even and divisible by {heads} heads, got {dim}")


class StagePatchEmbed(nn.Module):
    """One student stage onto a side x side token layout with a patch-embedding conv."""

    def __init__(self, grid: FeatureGrid, side: int, dim: int):
        super().__init__()
        self.grid = grid
        self.proj = PatchTokens(grid.channels, dim, grid.size, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.grid.to_map(x))


class RegionAttention(nn.Module):
    """`stage_grids`: the layout of each student stage."""

    def __init__(self, stage_grids: list[FeatureGrid], *, num_queries: int = 64, dim: int = 512,
                 heads: int = NUM_HEADS, batch_indexed_position: bool):
        super().__init__()
        check_region_attention(num_queries, dim, heads)
        self.batch_indexed_position = batch_indexed_position
        self.heads = heads
        self.tokens_per_stage = num_queries // NUM_STAGES
        side = math.isqrt(self.tokens_per_stage)
        self.projectors = nn.ModuleList(StagePatchEmbed(grid, side, dim) for grid in stage_grids)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.register_buffer("positional_encoding", sinusoidal_table(5000, dim))

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.tokens_per_stage, self.norm.normalized_shape[0])

    def forward(self, stage_features: list[torch.Tensor]) -> list[torch.Tensor]:
        tokens = self.norm(torch.cat([proj(f) for proj, f in zip(self.projectors, stage_features)], dim=1))
        q = self.to_q(tokens)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        if self.batch_indexed_position:
            position = self.positional_encoding[: tokens.shape[0]]  # (B, 1, dim): one vector per sample
        else:
            position = rearrange(self.positional_encoding[: tokens.shape[1]], "n 1 d -> 1 n d")
        q, k = q + position, k + position
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        out = rearrange(attention @ v, "b h n d -> b n (h d)")
        return list(out.split(self.tokens_per_stage, dim=1))
