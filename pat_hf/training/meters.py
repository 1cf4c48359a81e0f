"""What the training loop measures besides the Trainer's own loss: the distiller's loss components, averaged
over the steps of a logging window and of an epoch and over the processes, the images per second, the
unreadable images skipped, and the per-epoch rows of OUTPUT_DIR/summary.csv (the reference writes the same
file)."""

from __future__ import annotations

import csv
import io
import os
import re
import time
from typing import Any

import torch
from accelerate import Accelerator

from pat_hf.training.atomic import write_text_atomically

SUMMARY_FILE = "summary.csv"
# Evaluation metrics that go into summary.csv: loss, top-1 and top-5 of the raw and of every EMA student.
_SUMMARY_EVAL_KEY = re.compile(r"^eval_(ema\d*_)?(loss|top1|top5)$|^eval_max_top1$")


class LossSums:
    """Running sums of `loss*` outputs over training steps, on the device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.skipped_images: torch.Tensor | int = 0

    def add(self, outputs: dict[str, torch.Tensor], skipped_images: torch.Tensor | None = None) -> None:
        for key, value in outputs.items():
            if key.startswith("loss"):
                value = value.detach().float()
                total = self.sums.get(key)
                self.sums[key] = value if total is None else total + value
        if skipped_images is not None:
            self.skipped_images = self.skipped_images + skipped_images
        self.steps += 1

    def skipped(self, accelerator: Accelerator, device: torch.device) -> int:
        """Unreadable images dropped from the batches, all processes together (every process must call this)."""
        return int(accelerator.reduce(torch.as_tensor(self.skipped_images, device=device).float(), "sum"))

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Per-step means, averaged over the processes (every process must call this)."""
        if not self.steps:
            return {}
        keys = sorted(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[k] for k in keys]) / self.steps, reduction="mean")
        return {k: float(v) for k, v in zip(keys, means)}


class TrainingMeters:
    """The loss and its components over the current logging window and epoch, and the window's throughput.
    The window's `loss` replaces the Trainer's, which transformers computes apart (and would show a NaN step
    as the mean of the steps before it)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.window = LossSums()
        self.epoch = LossSums()
        self._images = 0
        self._window_start = time.perf_counter()

    def add(self, outputs: dict[str, torch.Tensor], batch_size: int,
            skipped_images: torch.Tensor | None = None) -> None:
        self.window.add(outputs, skipped_images)
        self.epoch.add(outputs, skipped_images)
        self._images += batch_size

    def reset_epoch(self) -> None:
        self.epoch.reset()

    def epoch_summary(self, device: torch.device) -> dict[str, float]:
        """The epoch's mean components and its count of skipped images (every process must call this)."""
        return {**self.epoch.means(self.accelerator), "skipped_images": self.epoch.skipped(self.accelerator, device)}

    def window_logs(self, device: torch.device) -> dict[str, float]:
        """The window's mean components and images per second (all processes together); starts a new window."""
        if not self.window.steps:
            return {}
        logs = {k: round(v, 6) for k, v in self.window.means(self.accelerator).items()}
        images = self.accelerator.reduce(torch.tensor(float(self._images), device=device), "sum")
        now = time.perf_counter()
        logs["train_images_per_second"] = round(float(images) / max(now - self._window_start, 1e-9), 2)
        logs["skipped_images"] = self.window.skipped(self.accelerator, device)
        self.window.reset()
        self._images, self._window_start = 0, now
        return logs


def write_summary_row(output_dir: str, epoch: float, lr: float | None, train_means: dict[str, float],
                      eval_metrics: dict[str, Any]) -> None:
    """One row of OUTPUT_DIR/summary.csv per epoch: epoch-mean training losses, the rate, and the epoch's
    evaluation of the raw and EMA students. Rows of epochs that a resumed run repeats are replaced."""
    epoch = round(epoch, 4)
    row = {"epoch": epoch, "lr": lr,
           **{("train_loss" if k == "loss" else k): v for k, v in train_means.items()},
           **{k: v for k, v in eval_metrics.items() if _SUMMARY_EVAL_KEY.match(k)}}
    path = os.path.join(output_dir, SUMMARY_FILE)
    header, rows = list(row), []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or []) + [k for k in row if k not in (reader.fieldnames or [])]
            rows = [r for r in reader if float(r["epoch"]) < epoch]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header, restval="")
    writer.writeheader()
    writer.writerows([*rows, row])
    write_text_atomically(path, text.getvalue())
