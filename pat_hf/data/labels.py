"""Labels, read from the label column alone: the number of classes, class names, the checks that every label
fits the model, and which training examples keep their label (--label-fraction, --allow-unlabelled).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, IterableDataset

from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import UNLABELLED
from pat_hf.data.sources import Split

# Mixed into --data_seed for the draw of the kept labels, so that it is independent of --max-train-samples' draw.
LABEL_DRAW_STREAM = 1


def label_array(dataset: Dataset) -> np.ndarray:
    """Every label of a map-style split, read without touching its images: one Arrow read, where iterating the
    column row by row takes minutes at ImageNet's size."""
    return dataset.select_columns(["label"]).with_format("arrow")[:]["label"].to_numpy()


def num_classes_of(dataset: Split) -> int:
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    if isinstance(dataset, IterableDataset):
        raise ValueError("the streamed label column is not a ClassLabel, so its number of classes is unknown; "
                         "pass --num-classes N")
    return int(label_array(dataset).max()) + 1


def resolve_num_classes(train: Split, requested: int | None) -> int:
    """--num-classes, or the training split's; never fewer than the split declares."""
    if requested and isinstance(train, IterableDataset) and not isinstance(train.features["label"], ClassLabel):
        return requested
    dataset_classes = num_classes_of(train)
    if requested and requested < dataset_classes:
        raise ValueError(f"--num-classes {requested} is fewer than the {dataset_classes} classes of the dataset; "
                         f"drop --num-classes to use the dataset's")
    return requested or dataset_classes


def class_names_of(dataset: Split | torch.utils.data.Dataset) -> list[str] | None:
    feature = dataset.features["label"]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _class_name(features: datasets.Features, label: int) -> str:
    feature = features["label"]
    return repr(feature.int2str(int(label))) if isinstance(feature, ClassLabel) else str(label)


def check_labels(train: Split, evaluation: Split, num_classes: int, allow_unlabelled: bool = False) -> None:
    """At least two classes in the training split, every label in 0..num_classes-1 (with `allow_unlabelled`,
    -1 too in the training split; the evaluation split is always fully labelled); streams are checked as they
    are read instead."""
    for name, split in (("training", train), ("evaluation", evaluation)):
        if isinstance(split, IterableDataset):
            continue
        labels = label_array(split)
        accepted = (labels >= 0) & (labels < num_classes)
        if allow_unlabelled and name == "training":
            accepted |= labels == UNLABELLED
        outside = np.flatnonzero(~accepted)
        if outside.size:
            row = int(outside[0])
            if allow_unlabelled and name == "evaluation" and labels[row] == UNLABELLED:
                raise ValueError(f"the evaluation split has {outside.size} unlabelled (-1) or out-of-range "
                                 f"label(s) (first at row {row}): --allow-unlabelled is for the training split; "
                                 f"evaluate on a fully labelled split (--val-split)")
            raise ValueError(f"the {name} split has {outside.size} label(s) outside 0..{num_classes - 1} "
                             f"(first: {labels[row]} at row {row}; -1 usually marks unlabelled examples): use a "
                             f"labelled split (--train-split / --val-split) or fix the label column"
                             + ("; --allow-unlabelled trains on -1 rows with the distillation terms alone"
                                if name == "training" and not allow_unlabelled else ""))
        if name == "training":
            present = np.unique(labels[labels != UNLABELLED])
            if present.size == 0:
                raise ValueError("every training example is unlabelled (-1): distillation needs labelled "
                                 "examples of at least 2 classes")
            if present.size < 2:
                raise ValueError(f"distillation needs at least 2 classes, but every training example is of class "
                                 f"{_class_name(split.features, present[0])}: give each class a sub-folder of its "
                                 f"own (train/CLASS/*.jpg) or pass another --label-column")


def labelled_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows keep their label: `fraction` of each class's labelled rows (at least one per class, so that
    every class is seen), drawn with `seed`; rows labelled -1 never. The same labels and seed give the same rows."""
    labelled = labels != UNLABELLED
    if fraction >= 1:
        return labelled
    rng = np.random.default_rng([seed, LABEL_DRAW_STREAM])
    kept = np.zeros(len(labels), dtype=bool)
    # Classes in increasing order, so that the draw does not depend on the order rows were read in.
    for label in np.unique(labels[labelled]):
        rows = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(rows)))
        kept[rng.choice(rows, size=count, replace=False)] = True
    return kept


def kept_labels(train: Split, data: DataArguments, seed: int, announce: bool = False) -> np.ndarray | None:
    """The training rows that keep their label (--label-fraction, -1 rows with --allow-unlabelled), or None when
    every row is labelled (batches as without few labels) or the split is streamed (a stream's -1 rows are met
    per example). `announce`: print how many are labelled."""
    if isinstance(train, IterableDataset):
        return None
    labelled = labelled_rows(label_array(train), data.label_fraction, seed)
    if labelled.all():
        return None
    if announce:
        print(f"pat-hf: {int(labelled.sum())} of the {len(labelled)} training examples are labelled (--label-fraction "
              f"{data.label_fraction:g}); the others are trained with the distillation terms alone", flush=True)
    return labelled


def train_labels_of(dataset: Dataset) -> torch.Tensor:
    """The class of every training example in dataset order (CRD's negatives), from the label column alone."""
    return torch.from_numpy(label_array(dataset).astype(np.int64))
