"""Labels, read from the label column alone: the number of classes, class names and the checks that every label
fits the model.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, IterableDataset

from pat_hf.data.sources import Split


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


def check_labels(train: Split, evaluation: Split, num_classes: int) -> None:
    """At least two classes in the training split, every label in 0..num_classes-1; streams are checked as
    they are read instead."""
    for name, split in (("training", train), ("evaluation", evaluation)):
        if isinstance(split, IterableDataset):
            continue
        labels = label_array(split)
        outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if outside.size:
            row = int(outside[0])
            raise ValueError(f"the {name} split has {outside.size} label(s) outside 0..{num_classes - 1} "
                             f"(first: {labels[row]} at row {row}; -1 usually marks unlabelled examples): use a "
                             f"labelled split (--train-split / --val-split) or fix the label column")
        if name == "training":
            present = np.unique(labels)
            if present.size < 2:
                raise ValueError(f"distillation needs at least 2 classes, but every training example is of class "
                                 f"{_class_name(split.features, present[0])}: give each class a sub-folder of its "
                                 f"own (train/CLASS/*.jpg) or pass another --label-column")


def train_labels_of(dataset: Dataset) -> torch.Tensor:
    """The class of every training example in dataset order (CRD's negatives), from the label column alone."""
    return torch.from_numpy(label_array(dataset).astype(np.int64))
