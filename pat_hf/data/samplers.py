"""Training samplers: a random order and repeated augmentation, both with a hook a resumed run needs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A sampler whose order depends on the epoch alone. `on_pass_start`, if set, runs right before a pass's
    first index is drawn: after the loader has set itself up, before any example of the pass is loaded (the
    trainer restores the RNG there when resuming mid-epoch)."""

    on_pass_start: Callable[[], None] | None = None

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        if self.on_pass_start is not None:
            self.on_pass_start()
        yield from self.indices()


class EpochRandomSampler(EpochSampler):
    """A random permutation per epoch, seeded by (seed, epoch) so every process draws the same one (accelerate
    shards it)."""

    def __init__(self, num_samples: int, seed: int):
        super().__init__()
        self.num_samples = num_samples
        self.seed = seed

    def indices(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


def check_aug_repeats(num_repeats: int, num_processes: int) -> None:
    """Repeated augmentation spreads an image's copies over processes, so it needs several (as in the reference)."""
    if num_repeats and num_processes < 2:
        raise ValueError("--aug-repeats needs a distributed run (as in the reference): launch several processes")


class InterleavedRepeatAugSampler(EpochSampler):
    """Repeated augmentation (`--aug-repeats`, DeiT's RASampler) under accelerate's batch sharding.

    The reference uses timm's `RepeatAugSampler`, which every process builds with its own rank. Under the
    Trainer, accelerate shards one global batch stream instead: process k takes batches k, k + P, k + 2P, ...
    So this sampler lays out, batch by batch, what `RepeatAugSampler` gives each rank, and accelerate's
    round-robin hands every process exactly the reference's per-rank stream."""

    def __init__(self, dataset: Sized, num_replicas: int, batch_size: int, num_repeats: int = 3):
        super().__init__()
        check_aug_repeats(num_repeats, num_replicas)
        self.per_rank = [RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=num_repeats)
                         for rank in range(num_replicas)]
        self.batch_size = batch_size
        # Full batches only: the training loader drops the last partial batch on every rank alike.
        self.batches_per_rank = len(self.per_rank[0]) // batch_size

    def indices(self) -> list[int]:
        streams = []
        for sampler in self.per_rank:
            sampler.set_epoch(self.epoch)
            streams.append(list(sampler))
        size = self.batch_size
        return [i for batch in range(self.batches_per_rank) for stream in streams
                for i in stream[batch * size:(batch + 1) * size]]

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size * len(self.per_rank)
