"""What the benchmarks' reports share: a line naming the machine, and writing a report file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pat_hf.export.cost import cpu_name


def describe_machine(device: str | None = None) -> str:
    """The GPU's name when `device` is a CUDA device (or, without one given, when CUDA is available),
    otherwise the CPU model and its core count."""
    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda:
        return torch.cuda.get_device_name(torch.device(device) if device else None)
    return f"{cpu_name()}, {os.cpu_count()} CPU cores"


def write_report(path: Path, text: str) -> None:
    """Write `text` to `path` (making its folder) so that the file is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
