"""Training samplers: a random order a resumed run can hook into, and repeated augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler


class InterleavedRepeatAugSampler(Sampler[int]):
    """Repeated augmentation (`--aug-repeats`, DeiT's RASampler) under accelerate's batch sharding.

    The reference uses timm's `RepeatAugSampler`, which every process builds with its own rank. Under the
    Trainer, accelerate shards one global batch stream instead: process k takes batches k, k + P, k + 2P, ...
    So this sampler lays out, batch by batch, what `RepeatAugSampler` gives each rank, and accelerate's
    round-robin hands every process exactly the reference's per-rank stream."""

    def __init__(self, dataset: Sized, num_replicas: int, batch_size: int, num_repeats: int = 3):
        if num_replicas < 2:
            raise ValueError("--aug-repeats needs a distributed run (as in the reference): launch several processes")
        self.per_rank = [RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=num_repeats)
                         for rank in range(num_replicas)]
        self.batch_size = batch_size
        # Full batches only: the training loader drops the last partial batch on every rank alike.
        self.batches_per_rank = len(self.per_rank[0]) // batch_size

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.per_rank:
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        streams = [list(sampler) for sampler in self.per_rank]
        for batch in range(self.batches_per_rank):
            for stream in streams:
                yield from stream[batch * self.batch_size:(batch + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size * len(self.per_rank)


class EpochRandomSampler(Sampler[int]):
    """A random permutation per epoch, seeded by (seed, epoch) so every process draws the same one (accelerate
    shards it). `on_pass_start`, if set, runs right before an epoch's first index is drawn: after the loader
    has set itself up, before any example of the pass is loaded (the trainer's RNG bookkeeping needs that)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.on_pass_start: Callable[[], None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.on_pass_start is not None:
            self.on_pass_start()
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples
