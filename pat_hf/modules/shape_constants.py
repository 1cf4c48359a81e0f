"""Tensors that depend on shapes, dtypes and devices only, built once per combination."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def shape_constant(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Cache `build` (hashable arguments) in eager mode, so no step rebuilds or copies its tensor to the device.
    Under torch.compile the builder is traced instead: the graph folds it into a constant, and dynamo would
    otherwise warn, at every compile, that it ignores the cache wrapper."""
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def constant(*args: object) -> torch.Tensor:
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    return constant
