"""Evaluation metrics shipped with the package, loadable offline through `evaluate.load(path)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TOPK_ACCURACY_PATH = str(Path(__file__).parent / "topk_accuracy")
TOP_K = 5


def load_topk_accuracy():
    import evaluate

    return evaluate.load(TOPK_ACCURACY_PATH)


def top_k_indices(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the top-5 class indices, not the whole logit matrix."""
    if isinstance(logits, tuple | list):
        logits = logits[0]
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


class TopkMetrics:
    """`compute_metrics` for the Trainer: top1/top5 in percent through the shipped evaluate module."""

    def __init__(self):
        self.metric = load_topk_accuracy()

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = np.asarray(eval_prediction.predictions)
        return self.metric.compute(predictions=predictions.tolist(),
                                   references=np.asarray(eval_prediction.label_ids).tolist())
