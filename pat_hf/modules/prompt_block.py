"""PAT's adaptive feedback prompt (AFP): a prompt added to the input of one teacher stage.

x <- x + beta * Prompt(Fusion(x, feedback)), where the feedback is the previous step's (aligned student -
prompted teacher) gap at the output of the same stage. Three of PAT's quirks live here (docs/REFERENCE.md,
Quirks): the gate-only squeeze-excitation makes the prompt constant over space; a token sequence goes back from
its 2-D map by a reshape instead of a permute; and the reference's last-token-as-class layout of sequences.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from pat_hf.modules.projectors import build_projector
from pat_hf.modules.quirks import PATQuirks
from pat_hf.modules.token_grid import FeatureGrid, Shape, channels, is_map
from pat_hf.modules.window_sums import mean_of_pointwise_then_window, pointwise_on_vectors


class SqueezeExcitation(nn.Module):
    def __init__(self, dim: int, reduction: int = 16, *, gate_only: bool):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.gate_only = gate_only
        self.compress = nn.Conv2d(dim, hidden, 1)
        self.excitation = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = rearrange(self.gate_of_mean(x.mean(dim=(2, 3))), "b c -> b c 1 1")
        return gate if self.gate_only else x * gate

    def gate_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """(B, C) gate of (B, C) spatial means."""
        hidden = torch.relu(pointwise_on_vectors(self.compress, mean))
        return torch.sigmoid(pointwise_on_vectors(self.excitation, hidden))


def _branch(convs: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A fusion or prompt branch. With a gate-only excitation its output is constant over space and depends on x
    through the spatial mean of its first three convolutions alone, which window sums give exactly without the
    full-size maps (the dense 5x5 convolution at full resolution was most of PAT's prompt cost)."""
    pointwise, window, mix, excitation, out = convs
    if not excitation.gate_only:
        return convs(x)
    mean = pointwise_on_vectors(mix, mean_of_pointwise_then_window(x, pointwise, window))
    return rearrange(pointwise_on_vectors(out, excitation.gate_of_mean(mean)), "b c -> b c 1 1")


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


class PromptBlock(nn.Module):
    """Prompt for one teacher stage. `feedback_shape`: the stage's output without set-aside tokens;
    `input_shape`: the stage's input, prefix tokens included; `input_size`: the image's (C, H, W)."""

    def __init__(self, feedback_shape: Shape, input_shape: Shape, input_size: tuple[int, ...], quirks: PATQuirks,
                 num_prefix_tokens: int = 0):
        super().__init__()
        dim = channels(input_shape)
        self.reshape_instead_of_permute = quirks.reshape_instead_of_permute
        layout = {"last_token_as_class": quirks.last_token_as_class}
        self.input_grid = FeatureGrid.of(input_shape, input_size, num_prefix_tokens, **layout)
        # The reference aligns the feedback to the stage's whole input sequence and then sets its "class token"
        # aside as it does x's; otherwise the feedback is aligned to the input's grid tokens alone.
        target_shape = input_shape if is_map(input_shape) or quirks.last_token_as_class else self.input_grid.grid_shape
        self.feedback_grid = FeatureGrid.of(target_shape, input_size, **layout)
        same_grid = FeatureGrid.of(feedback_shape, input_size, **layout) == self.feedback_grid
        self.feedback_aligner = nn.Identity() if same_grid else build_projector(feedback_shape, target_shape)
        self.fusion = _fusion(dim, gate_only=quirks.gate_only_excitation)
        self.prompt = _prompt(dim, gate_only=quirks.gate_only_excitation)
        # A zero-initialised conv made the reference diverge (NaN); it starts the blend weight at 0 instead.
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, feedback: torch.Tensor | None = None) -> torch.Tensor:
        if feedback is not None:
            feedback = self.feedback_grid.to_map(self.feedback_aligner(feedback))
        if x.ndim == 4:
            return x + self.beta * _branch(self.prompt, self._fuse(x, feedback))
        tokens, aside = self.input_grid.split(x)
        grid = self.input_grid.grid_to_map(tokens)
        grid = grid + self.beta * _branch(self.prompt, self._fuse(grid, feedback))
        if self.reshape_instead_of_permute:
            # Channels and tokens come back scrambled (docs/REFERENCE.md, Quirks).
            return self.input_grid.join(grid.reshape(tokens.shape), aside)
        return self.input_grid.join(rearrange(grid, "b c h w -> b (h w) c"), aside)

    def _fuse(self, x: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
        return x if feedback is None else _branch(self.fusion, torch.cat([x, feedback], dim=1))
