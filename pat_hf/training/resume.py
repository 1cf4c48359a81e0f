"""Resuming in the middle of an epoch so that the resumed run draws exactly what the uninterrupted one drew.

accelerate's loader fetches, and so augments, one batch ahead: when a checkpoint is saved after update u, batch
u+1 has already been drawn with the RNG, and transformers' saved RNG state is the one batch u+2 is drawn in.
transformers restores it only after the resumed run has drawn batch u+1 (in whatever state the generators
were), so that batch's augmentation differs. With an in-process loader (--workers 0) we record the state each
training batch is drawn in, save the one of the batch drawn ahead with the checkpoint, and on resume restore
it before batch u+1 is drawn and transformers' state right after. Resuming at an epoch boundary needs none of
this: transformers restores its state before the epoch's first batch. Evaluations leave the generators as
they found them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

from pat_hf.data.decoding import RESUME_SKIPPED
from pat_hf.data.samplers import EpochSampler
from pat_hf.training.checkpoints import restore_rng, rng_snapshot

FETCH_RNG_FILE = "rng_state_fetch_rank{rank}.pth"


class ExactResumeTrainer(Trainer):
    """A Trainer that resumes exactly mid-epoch. Its subclass calls `track_fetch_rng`, `fetch_rng_collate`,
    `save_fetch_rng` and `note_resume` where it builds the sampler and loader, saves and loads checkpoints."""

    _resumed_from: str | None = None
    _rng_before_next_fetch: dict[str, Any] | None = None
    _rng_before_latest_fetch: dict[str, Any] | None = None
    _restore_before_first_fetch: dict[str, Any] | None = None
    _restore_after_first_fetch: str | None = None
    _skip_next_rng_load = False

    @property
    def tracks_fetch_rng(self) -> bool:
        # Worker processes draw with their own generators, which no checkpoint captures.
        return self.args.dataloader_num_workers == 0

    def track_fetch_rng(self, sampler: EpochSampler) -> None:
        if self.tracks_fetch_rng:
            sampler.on_pass_start = self._on_sampler_pass_start

    def fetch_rng_collate(self, collate: Callable) -> Callable:
        """`collate`, recording the RNG state each training batch is drawn in."""
        if not self.tracks_fetch_rng:
            return collate

        def training_collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = collate(examples)
            if RESUME_SKIPPED in batch:
                return batch  # a batch of a resumed stream that is dropped unread: it draws nothing
            self._rng_before_latest_fetch = self._rng_before_next_fetch
            if self._restore_after_first_fetch is not None:
                super(ExactResumeTrainer, self)._load_rng_state(self._restore_after_first_fetch)
                self._restore_after_first_fetch = None
            self._rng_before_next_fetch = rng_snapshot()
            return batch

        return training_collate

    def save_fetch_rng(self, folder: str) -> None:
        if self._rng_before_latest_fetch is not None:
            torch.save(self._rng_before_latest_fetch,
                       os.path.join(folder, FETCH_RNG_FILE.format(rank=self.args.process_index)))

    def note_resume(self, checkpoint: str) -> None:
        self._resumed_from = checkpoint

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        # Evaluation draws from the global generators (the loader's base seed); leaving them as they were keeps
        # training independent of when it evaluates, so a resumed run, which does not repeat an evaluation that
        # followed its checkpoint, still draws what the uninterrupted run drew.
        state = rng_snapshot()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            restore_rng(state)

    def _on_sampler_pass_start(self) -> None:
        if self._restore_before_first_fetch is not None:
            restore_rng(self._restore_before_first_fetch)
            self._restore_before_first_fetch = None
        self._rng_before_next_fetch = rng_snapshot()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self._resumed_from is not None:
            # Still set: transformers did not restore the RNG at an epoch start, so this resume is mid-epoch.
            path = os.path.join(self._resumed_from, FETCH_RNG_FILE.format(rank=self.args.process_index))
            if self.tracks_fetch_rng and os.path.isfile(path):
                self._restore_before_first_fetch = torch.load(path, weights_only=True)
                self._restore_after_first_fetch = self._resumed_from
                self._skip_next_rng_load = True
            self._resumed_from = None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _load_rng_state(self, checkpoint) -> None:
        self._resumed_from = None
        if self._skip_next_rng_load:
            self._skip_next_rng_load = False
            return
        super()._load_rng_state(checkpoint)
