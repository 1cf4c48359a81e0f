"""The examples a trainer reads: a map-style split or a stream, decoding and transforming each image when it is
drawn."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from datasets import IterableDataset

from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import ExampleReader, ImageExamples
from pat_hf.data.sources import Split
from pat_hf.data.streaming import StreamedEvaluationSet, StreamedTrainingSet, default_samples_per_epoch


def attach_transform(dataset: Split, transform: Callable, with_index: bool = False, *,
                     strict_images: bool = False, num_classes: int | None = None,
                     max_samples: int | None = None, split: str = "evaluation") -> torch.utils.data.Dataset:
    """Examples that decode and transform their image when drawn: a map-style split (with `index`, the row's
    position, for distillers that need it) or an evaluation stream (at most `max_samples` examples)."""
    reader = ExampleReader(transform, num_classes, strict_images, split)
    if isinstance(dataset, IterableDataset):
        return StreamedEvaluationSet(dataset, reader, max_samples)
    return ImageExamples(dataset, reader, with_index)


def training_set(args: DataArguments, train: Split, transform: Callable, *, num_classes: int, with_index: bool,
                 batch_size: int, rank: int, world_size: int,
                 labelled: np.ndarray | None = None) -> torch.utils.data.Dataset:
    """The training examples: a map-style split, or a stream cut into epochs (`StreamedTrainingSet`).
    `labelled` (map-style splits): the rows that keep their label, when some do not (`labelled_rows`); each
    example then says whether it is labelled. A stream's examples do with --allow-unlabelled (-1 rows)."""
    if isinstance(train, IterableDataset):
        reader = ExampleReader(transform, num_classes, args.strict_images, "training", args.allow_unlabelled)
        return StreamedTrainingSet(train, reader, samples_per_epoch=default_samples_per_epoch(args, train),
                                   batch_size=batch_size, rank=rank, world_size=world_size)
    reader = ExampleReader(transform, num_classes, args.strict_images, "training", labelled is not None)
    return ImageExamples(train, reader, with_index, labelled)
