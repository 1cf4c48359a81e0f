"""One line naming the machine a benchmark ran on, for the tables the benchmarks print."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: str | None = None) -> str:
    """The GPU's name when `device` is a CUDA device (or, without one given, when CUDA is available),
    otherwise the CPU model and its core count."""
    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda:
        return torch.cuda.get_device_name(torch.device(device) if device else None)
    return f"{cpu_name()}, {os.cpu_count()} CPU cores"
