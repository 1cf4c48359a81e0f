"""The building blocks of the baseline distillers: grids, aligners, patch merging, branch heads, CRD memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pat_hf.modules.branch_heads import MapBranchHead, TokenBranchHead
from pat_hf.modules.contrast_memory import ContrastMemory
from pat_hf.modules.grid_aligner import GridAligner
from pat_hf.modules.negative_sampler import NegativeSampler
from pat_hf.modules.patch_merging import PatchMerging
from pat_hf.modules.token_grid import FeatureGrid, token_grid

torch.set_num_threads(1)


def test_token_grid_follows_the_input_aspect_ratio():
    assert token_grid(64, (3, 32, 32)) == (8, 8)
    assert token_grid(32, (3, 32, 64)) == (4, 8)
    assert token_grid(1, (3, 32, 32)) == (1, 1)
    with pytest.raises(ValueError, match="7 tokens do not form a grid"):
        token_grid(7, (3, 32, 32))


def test_feature_grid_drops_prefix_tokens_and_lays_tokens_row_major():
    grid = FeatureGrid.of((1 + 6, 2), (3, 20, 30), num_prefix_tokens=1)
    assert (grid.channels, grid.size, grid.is_sequence) == (2, (2, 3), True)
    tokens = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)
    as_map = grid.to_map(tokens)
    assert as_map.shape == (1, 2, 2, 3)
    # Token 1 + (row * 3 + column), channel c.
    assert float(as_map[0, 1, 1, 2]) == float(tokens[0, 1 + 5, 1])
    feature_map = torch.randn(1, 4, 5, 5)
    assert FeatureGrid.of((4, 5, 5), (3, 20, 20)).to_map(feature_map) is feature_map


@pytest.mark.parametrize(("in_size", "out_size"), [((4, 4), (4, 4)), ((8, 8), (2, 2)), ((2, 2), (8, 8)),
                                                   ((4, 8), (2, 4))])
def test_grid_aligner_output_shapes(in_size, out_size):
    aligner = GridAligner(3, in_size, 5, out_size)
    assert aligner(torch.randn(2, 3, *in_size)).shape == (2, 5, *out_size)


def test_grid_aligner_unfolds_each_cell_onto_its_own_block():
    aligner = GridAligner(1, (2, 2), 1, (4, 4), bias=False)
    nn.init.ones_(aligner.proj.weight)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(aligner(x), expected)


@pytest.mark.parametrize(("in_size", "out_size"), [((5, 5), (3, 3)), ((4, 2), (2, 4)), ((6, 6), (20, 20))])
def test_grid_aligner_pools_grids_that_are_not_multiples_onto_the_output_grid(in_size, out_size):
    aligner = GridAligner(3, in_size, 5, out_size)
    assert aligner.pool_to == out_size and aligner.proj.kernel_size == (1, 1)
    x = torch.randn(2, 3, *in_size, dtype=torch.float64)
    aligner = aligner.double()
    expected = torch.nn.functional.conv2d(torch.nn.functional.adaptive_avg_pool2d(x, out_size),
                                          aligner.proj.weight, aligner.proj.bias)
    torch.testing.assert_close(aligner(x), expected)
    assert GridAligner(3, (8, 8), 5, (2, 2)).pool_to is None  # multiples keep the reference's aligners


def test_patch_merging_concatenates_neighbours_row_offset_first():
    merging = PatchMerging(1, 4)
    merging.norm = nn.Identity()
    nn.init.eye_(merging.reduction.weight)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    # (0,0), (1,0), (0,1), (1,1) of the 2x2 block.
    torch.testing.assert_close(merging(x), torch.tensor([1.0, 3.0, 2.0, 4.0]).reshape(1, 1, 1, 4))


def test_patch_merging_pads_odd_grids():
    assert PatchMerging(3, 8)(torch.randn(2, 5, 3, 3)).shape == (2, 3, 2, 8)


def test_map_branch_head_widens_to_the_head_width():
    head = MapBranchHead(8, num_downsamples=2, width=40, num_classes=7)
    assert [block.mix_pw.out_channels for block in head.features] == [16, 40]
    assert head(torch.randn(2, 8, 8, 8)).shape == (2, 7)
    last = MapBranchHead(8, num_downsamples=0, width=40, num_classes=7)
    assert isinstance(last.features[0], nn.Conv2d) and last.features[0].out_channels == 40


def test_token_branch_head_activations_and_width_projection():
    head = TokenBranchHead(8, num_merges=3, num_blocks=1, width=16, num_classes=5)
    assert [type(m.act) for m in head.downsample] == [nn.GELU, nn.GELU, nn.Identity]
    assert head(torch.randn(2, 8, 8, 8)).shape == (2, 5)
    projected = TokenBranchHead(8, num_merges=0, num_blocks=1, width=16, num_classes=5)
    assert isinstance(projected.downsample[0], nn.Linear)
    with pytest.raises(ValueError, match="width 18 cannot have 4 attention heads"):
        TokenBranchHead(8, num_merges=0, num_blocks=1, width=18, num_classes=5)


def test_negative_sampler_draws_only_other_classes_uniformly():
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1])
    sampler = NegativeSampler(labels)
    assert sampler.smallest_pool == len(labels) - 3
    torch.manual_seed(0)
    index = torch.tensor([0, 1, 3, 6])
    negatives = sampler(index, 4000)
    assert negatives.shape == (4, 4000)
    assert bool((labels[negatives] != labels[index].unsqueeze(1)).all())
    # Anchor 3 (class 2) has five negatives, each drawn with probability 1/5.
    frequencies = torch.bincount(negatives[2], minlength=len(labels)).float() / 4000
    allowed = (labels != 2).float() / 5
    torch.testing.assert_close(frequencies, allowed, atol=0.03, rtol=0)


def test_negative_sampler_rejects_a_single_class():
    with pytest.raises(ValueError, match="all 3 training examples are of class 1, so it has no negatives"):
        NegativeSampler(torch.tensor([1, 1, 1]))


def test_contrast_memory_scores_normalisers_and_update():
    memory = ContrastMemory(dim=2, num_examples=3, temperature=0.5, momentum=0.5)
    memory.student_bank.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    memory.teacher_bank.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]]))
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    contrast_index = torch.tensor([[0, 2]])
    student_scores, teacher_scores = memory(student, teacher, contrast_index)
    # Student embedding against teacher rows 0, 2: <.,.> = 0, 0.8; teacher embedding against student rows: 0, 0.8.
    raw = torch.tensor([[1.0, math.exp(1.6)]])
    z = float(raw.mean()) * 3
    torch.testing.assert_close(memory.normalisers, torch.tensor([z, z]))
    torch.testing.assert_close(student_scores, raw / z)
    torch.testing.assert_close(teacher_scores, raw / z)
    # The normalisers stay frozen at their first value.
    memory(student * 0, teacher * 0, contrast_index)
    torch.testing.assert_close(memory.normalisers, torch.tensor([z, z]))
    memory.update(torch.tensor([1]), student, teacher)
    # Row 1: 0.5 * bank + 0.5 * embedding, renormalised.
    torch.testing.assert_close(memory.student_bank[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(memory.teacher_bank[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
