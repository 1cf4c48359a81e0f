"""The training curves of a run, from OUTPUT_DIR/summary.csv: loss components and evaluation top-1 per epoch."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure

TRAINING_CURVES_FILE = "training_curves.png"


def read_summary(path: str | Path) -> dict[str, list[float]]:
    """summary.csv as columns of floats (NaN where an epoch has no value, e.g. no evaluation)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    return {name: [float(row[name]) if row.get(name) else math.nan for row in rows] for name in columns}


def loss_columns(summary: dict[str, list[float]]) -> list[str]:
    """The training loss and its components (`loss_gt`, `loss_kd`, ...), total first."""
    return [name for name in summary if name == "train_loss"] + sorted(n for n in summary if n.startswith("loss_"))


def top1_columns(summary: dict[str, list[float]]) -> list[str]:
    """Evaluation top-1 of the raw student and of each EMA student."""
    return [name for name in summary if name.startswith("eval_") and name.endswith("top1") and "max" not in name]


def training_curves_figure(summary: dict[str, list[float]], title: str = "") -> Figure:
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    losses, accuracy = figure.subplots(1, 2)
    epochs = summary["epoch"]
    for name in loss_columns(summary):
        losses.plot(epochs, summary[name], marker="o", markersize=3, label=name)
    losses.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="training loss")
    for name in top1_columns(summary):
        accuracy.plot(epochs, summary[name], marker="o", markersize=3, label=name.removeprefix("eval_"))
    accuracy.set(xlabel="epoch", ylabel="top-1 (%)", title="evaluation top-1")
    for axes in (losses, accuracy):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def write_training_curves(summary_csv: str | Path, png: str | Path, title: str = "") -> Path | None:
    """Plot summary.csv into `png`; None (and no file) when the run logged no epoch."""
    if not Path(summary_csv).is_file():
        return None
    summary = read_summary(summary_csv)
    if not summary.get("epoch"):
        return None
    training_curves_figure(summary, title).savefig(png, dpi=110)
    return Path(png)
