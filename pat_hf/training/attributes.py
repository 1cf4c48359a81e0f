"""Setting an attribute for the length of a block: how pat-hf adjusts a Trainer's behaviour for one call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def temporarily(obj: Any, name: str, value: Any) -> Iterator[None]:
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


@contextlib.contextmanager
def instead_of_method(obj: Any, name: str, function: Callable) -> Iterator[None]:
    """`obj.name` is `function` within the block (an instance attribute over the class's method)."""
    setattr(obj, name, function)
    try:
        yield
    finally:
        delattr(obj, name)
