"""PAT's fast paths compute what the plain modules compute: outputs, gradients and BatchNorm state, in float64."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pat_hf.config.arguments import RecipeArguments
from pat_hf.modules.hcl import POOL_LEVELS, hierarchical_context_loss
from pat_hf.modules.patch_tokens import PatchTokens
from pat_hf.modules.projectors import build_projector
from pat_hf.modules.prompt_block import _branch, _fusion, _prompt
from pat_hf.modules.window_sums import tap_sums
from pat_hf.training.host_memory import keep_freed_host_memory
from pat_hf.training.schedule import create_timm_optimizer


def grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    return torch.autograd.grad((output * weights).sum(), inputs)


def assert_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [(2, 3), (1, 1), (7, 7), (12, 9)])
def test_tap_sums_are_the_sums_each_tap_of_a_padded_kernel_reads(size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    padded = F.pad(x, (2, 2, 2, 2))
    expected = torch.stack([torch.stack([padded[..., i:i + size[0], j:j + size[1]].sum((-2, -1)) for j in range(5)],
                                        -1) for i in range(5)], -2)
    torch.testing.assert_close(tap_sums(x, (5, 5), (2, 2)), expected)


@pytest.mark.parametrize("size", [(14, 14), (7, 5), (1, 1), (2, 3)])
@pytest.mark.parametrize("branch,in_channels", [(_fusion, 32), (_prompt, 16)])
def test_gate_only_branch_by_window_sums_equals_the_convolutions(branch, in_channels, size):
    torch.manual_seed(0)
    convs = branch(16, gate_only=True).double()
    x = torch.randn(3, in_channels, *size, dtype=torch.float64, requires_grad=True)
    inputs = [x, *convs.parameters()]
    expected = convs(x)
    actual = _branch(convs, x)
    assert actual.shape == expected.shape == (3, 16, 1, 1)
    assert_close([actual, *grads(actual, inputs)], [expected, *grads(expected, inputs)])


def test_branch_with_a_full_excitation_runs_the_convolutions():
    convs = _prompt(16, gate_only=False)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(_branch(convs, x), convs(x), rtol=0, atol=0)


@pytest.mark.parametrize("in_shape,out_shape", [((24, 4, 4), (8, 56, 56)), ((24, 4, 4), (8, 14, 14)),
                                                ((16, 7, 5), (8, 14, 9)), ((16, 8, 8), (8, 4, 4))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_map_to_map_normalises_before_growing_as_after(in_shape, out_shape, momentum):
    torch.manual_seed(0)
    fast = build_projector(in_shape, out_shape).double()
    fast.proj[0].momentum = momentum
    plain = copy.deepcopy(fast)
    for _ in range(3):
        x = torch.randn(4, *in_shape, dtype=torch.float64, requires_grad=True)
        actual = fast(x)
        expected = plain.proj(F.interpolate(x, size=out_shape[1:], mode="nearest"))
        assert_close([actual, *grads(actual, [x, *fast.parameters()])],
                     [expected, *grads(expected, [x, *plain.parameters()])])
    assert_close(list(fast.buffers()), list(plain.buffers()))
    fast.eval(), plain.eval()
    x = torch.randn(2, *in_shape, dtype=torch.float64)
    torch.testing.assert_close(fast(x), plain.proj(F.interpolate(x, size=out_shape[1:], mode="nearest")))


@pytest.mark.parametrize("patch", [2, 14])
def test_patch_tokens_equal_the_strided_convolution(patch):
    torch.manual_seed(0)
    embed = PatchTokens(5, 7, (4 * patch, 4 * patch), side=4).double()
    x = torch.randn(2, 5, 4 * patch, 4 * patch, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, embed.weight, embed.bias, stride=patch).flatten(2).transpose(1, 2)
    actual = embed(x)
    assert actual.shape == (2, 16, 7)
    assert_close([actual, *grads(actual, [x, embed.weight])], [expected, *grads(expected, [x, embed.weight])])


def test_patch_tokens_resize_a_map_to_a_multiple_of_the_grid_first():
    embed = PatchTokens(3, 4, (14, 14), side=4)
    assert embed.kernel_size == (4, 4) and embed.in_size == (16, 16)
    x = torch.randn(2, 3, 14, 14)
    expected = F.conv2d(F.interpolate(x, size=(16, 16), mode="nearest"), embed.weight, embed.bias, stride=4)
    torch.testing.assert_close(embed(x), expected.flatten(2).transpose(1, 2))


def naive_hierarchical_context_loss(student, teacher):
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in POOL_LEVELS:
        if level < min(student.shape[-2:]):
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level),
                                              F.adaptive_avg_pool2d(teacher, level))
            total += weight
    return loss / total


@pytest.mark.parametrize("size", [(56, 56), (14, 14), (7, 7), (6, 10), (3, 3)])
def test_hierarchical_context_loss_pools_the_difference_once(size):
    student = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    actual, expected = hierarchical_context_loss(student, teacher), naive_hierarchical_context_loss(student, teacher)
    assert_close([actual, *grads(actual, [student, teacher])], [expected, *grads(expected, [student, teacher])])


def test_optimizers_use_the_multi_tensor_update_where_they_have_one():
    model = nn.Linear(3, 2)
    assert create_timm_optimizer(model, RecipeArguments(opt="sgd"), 0.1, 1e-4).defaults["foreach"] is True
    assert create_timm_optimizer(model, RecipeArguments(opt="adamw"), 0.1, 1e-4).defaults["foreach"] is True
    assert "foreach" not in create_timm_optimizer(model, RecipeArguments(opt="adamp"), 0.1, 1e-4).defaults


def test_freed_host_memory_is_kept_on_glibc_linux():
    assert keep_freed_host_memory() is True


def test_shape_constants_are_built_once_eagerly_and_traced_without_a_warning_compiled():
    from pat_hf.modules.window_sums import _tap_indicator

    first = _tap_indicator(7, 3, 1, torch.float32, torch.device("cpu"))
    assert _tap_indicator(7, 3, 1, torch.float32, torch.device("cpu")) is first  # eager: cached
    x = torch.randn(2, 3, 7, 7)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(tap_sums, backend="eager", fullgraph=True)(x, (3, 3), (1, 1))
    assert torch.allclose(compiled, tap_sums(x, (3, 3), (1, 1)))
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
