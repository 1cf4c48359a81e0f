"""The console entry points: pat-hf-train, pat-hf-evaluate, pat-hf-push, pat-hf-export.

Each one runs its command under the failure contract of pat_hf/cli/failures.py; the command's module is
imported inside it, so that even an interrupt during the imports ends as the contract says.
"""

from __future__ import annotations

from pat_hf.cli.failures import run_command


def train_command(argv: list[str] | None = None) -> None:
    run_command("pat-hf-train", "pat_hf.cli.train:main", argv)


def evaluate_command(argv: list[str] | None = None) -> None:
    run_command("pat-hf-evaluate", "pat_hf.cli.evaluate:main", argv)


def push_command(argv: list[str] | None = None) -> None:
    run_command("pat-hf-push", "pat_hf.cli.push:main", argv)


def export_command(argv: list[str] | None = None) -> None:
    run_command("pat-hf-export", "pat_hf.cli.export:main", argv)
