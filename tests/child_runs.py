"""Training runs in child processes forked from a server that has imported pat-hf once (multiprocessing's
forkserver): a child starts in a fraction of a second, where a fresh interpreter spends many seconds importing
torch, timm and transformers, and it can be SIGKILLed like any process."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import torch

from pat_hf.cli import train as pat_train


def _run_main(argv: list[str], log: str) -> None:
    """In the child: pat_train.main(argv) on one thread (as the tests run), its output in `log`."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    pat_train.main(argv)


def start_child(argv: list[str], log: Path) -> multiprocessing.Process:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    process = context.Process(target=_run_main, args=(argv, str(log)))
    process.start()
    return process


def finish_child(process: multiprocessing.Process, log: Path, timeout: float = 300) -> None:
    process.join(timeout)
    assert process.exitcode == 0, log.read_text()[-3000:]
