"""Streamed splits (--streaming): every process and data worker reads a disjoint share, cut into epochs of
--samples-per-epoch examples, and a resumed run passes over what it trained on without decoding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from typing import Any

import datasets
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from transformers import TrainingArguments
from transformers.trainer_utils import seed_worker

from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import RESUME_SKIPPED, ExampleReader

# Rows read from a stream at a time (their images stay encoded until drawn).
STREAM_READ_BATCH = 64

def _worker() -> tuple[int, int]:
    """(this data worker's index, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _share_of(total: int, parts: int, part: int) -> int:
    """Part `part` of `total` split into `parts` near-equal whole parts, the larger ones first."""
    return total // parts + int(part < total % parts)


def stream_share(stream: IterableDataset, consumer: int, consumers: int) -> IterableDataset:
    """One reader's disjoint share of a stream: whole shards when there are at least as many as readers
    (uneven when they do not divide), else every `consumers`-th example."""
    strategy = "shards" if stream.num_shards >= consumers else "examples"
    return split_dataset_by_node(stream, rank=consumer, world_size=consumers, strategy=strategy)


def _rows(share: IterableDataset, epoch: int) -> Iterator[tuple[dict[str, Any], int]]:
    # `iter` reads this share alone: iterating the dataset itself would split it again between data workers.
    share.set_epoch(epoch)
    for batch in share.iter(batch_size=STREAM_READ_BATCH):
        yield from zip(batch["image"], batch["label"])


def default_samples_per_epoch(args: DataArguments, stream: IterableDataset) -> int:
    """--samples-per-epoch, else the split's size from the dataset's info; --max-train-samples caps it."""
    splits = dict(stream.info.splits or {})
    # A local split streamed by `_as_stream` has no split name but one entry.
    info = splits.get(str(stream.split)) or (next(iter(splits.values())) if len(splits) == 1 else None)
    known = info.num_examples if info else None
    samples = args.samples_per_epoch or known
    if args.max_train_samples:
        samples = min(samples or args.max_train_samples, args.max_train_samples)
    if not samples:
        raise ValueError("the streamed training split does not say how many examples it holds; pass "
                         "--samples-per-epoch N (the examples one epoch draws)")
    return samples


class _StreamedExamples(torch.utils.data.IterableDataset):
    """A stream whose rows become `pixel_values`/`labels` as they are read; the images stay encoded until then."""

    def __init__(self, stream: IterableDataset, reader: ExampleReader):
        self.stream = stream.cast_column("image", datasets.Image(decode=False))
        self.reader = reader

    @property
    def features(self) -> datasets.Features:
        return self.stream.features

    @property
    def split(self) -> datasets.NamedSplit | None:
        return self.stream.split


class StreamedTrainingSet(_StreamedExamples):
    """A streamed training split cut into epochs of `samples_per_epoch` examples (all processes together,
    whole batches per process), so that the Trainer sees a length and the per-epoch schedule, evaluation and
    checkpoints work as with a map-style split.

    Every (process, data worker) reads a disjoint share of the stream (`stream_share`), shuffled by `datasets`
    through a buffer in an order fixed by (seed, epoch) and its share. A worker yields exactly its quota of
    batches, starting its share again if the share is shorter, so every process steps alike under DDP; with
    shards of unequal size an epoch thus repeats a few examples and leaves others for later epochs.

    Resuming mid-epoch, the Trainer skips the batches already trained on; `resume_batches` makes their
    examples placeholders that are read but never decoded. `on_pass_start` runs as an epoch's reading starts,
    in the main process with --workers 0 (exact resumes restore the RNG there, as with a sampler)."""

    on_pass_start: Callable[[], None] | None = None

    def __init__(self, stream: IterableDataset, reader: ExampleReader, *, samples_per_epoch: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(stream, reader)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.batches_per_process = samples_per_epoch // (batch_size * world_size)
        if not self.batches_per_process:
            raise ValueError(f"an epoch of {samples_per_epoch} streamed examples is less than one batch per process "
                             f"({batch_size} x {world_size}): raise --samples-per-epoch or lower --batch-size")
        # Shared with persistent data workers, which keep their own copy of this object between epochs.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.resume_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.batches_per_process * self.batch_size

    def _endless_rows(self, worker: int, workers: int) -> Iterator[tuple[dict[str, Any], int]]:
        share = stream_share(self.stream, self.rank * workers + worker, self.world_size * workers)
        epoch = int(self._epoch)
        while True:
            empty = True
            for row in _rows(share, epoch):
                empty = False
                yield row
            if empty:
                raise ValueError(f"data worker {worker} of process {self.rank} got no examples of the stream "
                                 f"({self.stream.num_shards} shards for {self.world_size * workers} readers): "
                                 f"use fewer --workers")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.on_pass_start is not None:
            self.on_pass_start()
        worker, workers = _worker()
        # The loader takes batches from its workers in turn: worker w makes batches w, w + workers, ...
        quota = _share_of(self.batches_per_process, workers, worker) * self.batch_size
        resumed = _share_of(self.resume_batches, workers, worker) * self.batch_size
        rows = self._endless_rows(worker, workers)
        for position, (encoded, label) in enumerate(islice(rows, quota)):
            if position < resumed:
                yield {RESUME_SKIPPED: True}
            else:
                yield self.reader.read(encoded, label, f"example {position} of process {self.rank}'s worker "
                                                       f"{worker} in epoch {int(self._epoch)}")


class StreamedEvaluationSet(_StreamedExamples):
    """A streamed evaluation split, read whole (or its first `max_samples` examples) at each evaluation, its
    data workers reading disjoint shares. accelerate reads it on the main process and hands every process its
    part of each batch, so that every example is evaluated once."""

    def __init__(self, stream: IterableDataset, reader: ExampleReader, max_samples: int | None = None):
        super().__init__(stream, reader)
        self.max_samples = max_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        quota = None if self.max_samples is None else _share_of(self.max_samples, workers, worker)
        rows = _rows(stream_share(self.stream, worker, workers), epoch=0)
        for position, (encoded, label) in enumerate(islice(rows, quota)):
            yield self.reader.read(encoded, label, f"example {position} of evaluation worker {worker}")


def streamed_training_loader(stream: StreamedTrainingSet, batch_size: int, collate: Callable,
                             args: TrainingArguments) -> DataLoader:
    """The stream already splits itself between processes and workers: accelerate places the batches on the
    device but must not shard the stream again (it would keep a 1/processes of each process's share) nor read
    it on one process and dispatch it."""
    workers = args.dataloader_num_workers
    loader = DataLoader(
        stream, batch_size=batch_size, collate_fn=collate, drop_last=True, num_workers=workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=bool(args.dataloader_persistent_workers and workers > 0),
        prefetch_factor=args.dataloader_prefetch_factor,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index))
    return prepare_data_loader(loader, args.device, num_processes=1, process_index=0, put_on_device=True,
                               dispatch_batches=False, rng_types=None, non_blocking=args.dataloader_pin_memory)
