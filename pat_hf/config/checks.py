"""What is wrong with a command line, as errors the commands end with exit status 2 (pat_hf/cli/failures.py).

A leaf module (nothing of pat-hf, nothing heavy), so that the argument dataclasses, the distillers, the model
factory and the failure contract can all raise and recognise these errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, NoReturn


class UsageError(ValueError):
    """A command line that cannot be run as given (exit status 2)."""


class UsageFileNotFoundError(UsageError, FileNotFoundError):
    """A file named on the command line (a --config) that does not exist: still a FileNotFoundError to callers."""


class InvalidValue(UsageError):
    """A value outside its accepted range. `dest` is the field it sets, so that the parser can name the YAML key
    (and file) when the value came from a --config file instead of a flag."""

    def __init__(self, dest: str, flag: str, requirement: str, value: Any):
        self.dest, self.flag, self.requirement, self.value = dest, flag, requirement, value
        super().__init__(self.naming(flag))

    def naming(self, name: str) -> str:
        """The message with `name` (a flag, or `key 'x' in FILE`) as the subject."""
        shown = f"{self.value:g}" if isinstance(self.value, float) else repr(self.value)
        return f"{name} {self.requirement}, got {shown}"


def flag_of(dest: str) -> str:
    """The dashed flag of a field (HfArgumentParser accepts it next to the underscored one)."""
    return "--" + dest.replace("_", "-")


def require(ok: bool, dest: str, requirement: str, value: Any, flag: str | None = None) -> None:
    """Raise InvalidValue('FLAG REQUIREMENT, got VALUE') unless `ok`."""
    if not ok:
        raise InvalidValue(dest, flag or flag_of(dest), requirement, value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None and low == 0:
        return "must be positive" if low_open else "must be 0 or more"
    if high is None:
        return f"must be {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"must be {'<' if high_open else '<='} {high:g}"
    return f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(value: float | None, dest: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, flag: str | None = None) -> None:
    """`value` within the interval (None: not given, accepted); NaN never is."""
    if value is None:
        return
    ok = isinstance(value, int | float) and not math.isnan(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    require(ok, dest, _interval(low, high, low_open, high_open), value, flag)


def check_probability(value: float, dest: str, *, one_excluded: bool = False, flag: str | None = None) -> None:
    check_range(value, dest, low=0.0, high=1.0, high_open=one_excluded, flag=flag)


def check_count(value: int | None, dest: str, *, at_least: int = 1, none_means: str = "",
                flag: str | None = None) -> None:
    """A whole number of at least `at_least`; `none_means` says what leaving it out does, for the message."""
    if value is None:
        return
    requirement = "must be 0 or more" if at_least == 0 else f"must be at least {at_least}"
    requirement += f" (leave it out for {none_means})" if none_means else ""
    require(value >= at_least, dest, requirement, value, flag)


def json_object(value: Any, flag: str) -> dict:
    """A JSON-object option (--model-kwargs): a mapping as it is (from YAML), or a JSON text parsed."""
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value or "{}")
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} must be a JSON object, e.g. '{{\"img_size\": 32}}': {error}") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"{flag} must be a JSON object, got {value!r}")
    return parsed


class OneLineErrors:
    """For an argparse parser class: its errors as one line on stderr (no usage block), exit status 2 as
    argparse's. Every process of a distributed launch reads the same command line: the first one says it."""

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        first_process = int(os.environ.get("RANK", "0")) == 0
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n" if first_process else None)


class OneLineArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """An argparse parser whose errors are one line."""
