"""PAT's adaptive feedback prompt (AFP): a prompt added to the input of one teacher stage.

x <- x + beta * Prompt(Fusion(x, feedback)), where the feedback is the previous step's (aligned student -
prompted teacher) gap at the output of the same stage. `faithful=True` reproduces the reference exactly,
including two defects (SPEC §6.1, 6.2, 6.4): the squeeze-excitation returns its gate only, so the prompt is
constant over space; and sequences are turned back from the 2-D map with a reshape instead of a permute, with
the *last* token set aside as if it were the class token. `faithful=False` fixes all three.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from pat_hf.modules.projectors import build_projector
from pat_hf.modules.shapes import Shape, channels, grid_token_count, is_map, is_square, side, split_grid_tokens


class SqueezeExcitation(nn.Module):
    def __init__(self, dim: int, reduction: int = 16, *, gate_only: bool):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.gate_only = gate_only
        self.compress = nn.Conv2d(dim, hidden, 1)
        self.excitation = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.excitation(torch.relu(self.compress(gate))))
        return gate if self.gate_only else x * gate


def _fusion(dim: int, gate_only: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2 * dim, dim, 1),
        nn.Conv2d(dim, dim, 5, padding=2),
        nn.Conv2d(dim, dim, 1),
        SqueezeExcitation(dim, gate_only=gate_only),
        nn.Conv2d(dim, dim, 1),
    )


def _prompt(dim: int, gate_only: bool) -> nn.Sequential:
    groups = 4 if dim % 4 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(dim, dim, 1, groups=groups),
        nn.Conv2d(dim, dim, 5, padding=2, groups=dim),
        nn.Conv2d(dim, dim, 1),
        SqueezeExcitation(dim, gate_only=gate_only),
        nn.Conv2d(dim, dim, 1, groups=groups),
    )


def _same_grid(a: Shape, b: Shape) -> bool:
    return side(a) == side(b) and channels(a) == channels(b)


class PromptBlock(nn.Module):
    """Prompt for one teacher stage. `feedback_shape`: the stage's output; `input_shape`: the stage's input."""

    def __init__(self, feedback_shape: Shape, input_shape: Shape, *, faithful: bool, num_prefix_tokens: int = 0):
        super().__init__()
        dim = channels(input_shape)
        self.faithful = faithful
        self.num_prefix_tokens = num_prefix_tokens
        # The corrected mode's feedback carries no prefix tokens; the reference's goes through the same split as x.
        target_shape = input_shape if faithful or is_map(input_shape) else (
            grid_token_count(input_shape[0], faithful=False, num_prefix_tokens=num_prefix_tokens), input_shape[1])
        self.feedback_aligner = (nn.Identity() if _same_grid(feedback_shape, target_shape)
                                 else build_projector(feedback_shape, target_shape))
        self.fusion = _fusion(dim, gate_only=faithful)
        self.prompt = _prompt(dim, gate_only=faithful)
        # A zero-initialised conv made the reference diverge (NaN); it starts the blend weight at 0 instead.
        self.beta = nn.Parameter(torch.zeros(1))
        if not is_map(input_shape) and not is_square(target_shape[0]) and not faithful:
            raise ValueError(f"a prompt needs a square token grid, got {target_shape[0]} tokens")

    def forward(self, x: torch.Tensor, feedback: torch.Tensor | None = None) -> torch.Tensor:
        if feedback is not None:
            feedback = self.feedback_aligner(feedback)
        if x.ndim == 4:
            return x + self.beta * self.prompt(self._fuse(x, feedback))
        x, aside = split_grid_tokens(x, faithful=self.faithful, num_prefix_tokens=self.num_prefix_tokens)
        grid = rearrange(x, "b (h w) c -> b c h w", h=side(x.shape[1:]))
        if feedback is not None:
            if self.faithful:
                feedback = split_grid_tokens(feedback, faithful=True, num_prefix_tokens=0)[0]
            feedback = rearrange(feedback, "b (h w) c -> b c h w", h=grid.shape[-1])
        grid = grid + self.beta * self.prompt(self._fuse(grid, feedback))
        if self.faithful:
            # The reference's reshape: channels and tokens come back scrambled (SPEC §6.1).
            return torch.cat([grid.reshape(x.shape), aside], dim=1)
        return torch.cat([aside, rearrange(grid, "b c h w -> b (h w) c")], dim=1)

    def _fuse(self, x: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
        return x if feedback is None else self.fusion(torch.cat([x, feedback], dim=1))
