"""Top-1 and top-5 accuracy, in percent, from the top-k predicted class indices of each example."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-k accuracy: the percentage of examples whose label is among the k highest-scoring classes.
Predictions are the class indices sorted by decreasing score (at least one per example); references are the
labels. Reports top1 and top5 (topk with k = the number of indices given when fewer than 5)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of int, the top-k class indices of each example, best first.
    references: list of int, the label of each example.
Returns:
    top1: float, percentage of examples whose best class is the label.
    top5: float, percentage whose label is among the first five (or all given) indices.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)[:, None]
        hits = predictions[:, :5] == references
        return {"top1": float(hits[:, 0].mean() * 100), "top5": float(hits.any(axis=1).mean() * 100)}
