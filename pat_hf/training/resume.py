"""Resuming a run: which checkpoint it continues from, and continuing mid-epoch exactly where it stopped.

`identity_and_resume_checkpoint` is what the command line calls: this run's identity (what its checkpoints
record) and, with --resume or --resume_from_checkpoint, the complete checkpoint of the same run to continue from.
A checkpoint with a file missing or damaged is refused, naming the file and the newest other checkpoint that
passes the same checks: --resume never falls back to an older checkpoint by itself, since silently training
steps again would surprise as much as a resume that is not exact.

`ExactResume` makes a mid-epoch resume draw what the uninterrupted run drew. accelerate's loader fetches, and so
augments, one batch ahead: when a checkpoint is saved after update u, batch u+1 has already been drawn with the
RNG, and transformers' saved RNG state is the one batch u+2 is drawn in. transformers restores it only after the
resumed run has drawn batch u+1 (in whatever state the generators were), so that batch's augmentation differs.
With an in-process loader (--workers 0) we record the state each training batch is drawn in, save the one of
the batch drawn ahead with the checkpoint, and on resume restore it before batch u+1 is drawn and transformers'
state right after. Resuming at an epoch boundary needs none of this: transformers restores its state before the
epoch's first batch. Evaluations leave the generators as they found them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from pat_hf.config.arguments import RunArguments
from pat_hf.data.decoding import RESUME_SKIPPED
from pat_hf.data.samplers import EpochSampler
from pat_hf.data.streaming import StreamedTrainingSet
from pat_hf.models.factory import require_file
from pat_hf.training.checkpoints import (
    DamagedCheckpointError,
    check_resumable,
    checkpoint_folders,
    file_sha256,
    is_complete,
    latest_complete_checkpoint,
    restore_rng,
    rng_snapshot,
    trained_epochs,
    verify_checkpoint,
)
from pat_hf.training.schedule import training_epochs

logger = logging.getLogger(__name__)

FETCH_RNG_FILE = "rng_state_fetch_rank{rank}.pth"


# ---- choosing the checkpoint to resume ----

def teacher_weights_id(args: RunArguments) -> str | None:
    """The teacher's weights by content (the sha256 of the file) for the checkpoints' identity; a Hub name as
    given. A missing file is an error here, before any data is read."""
    path = args.model.teacher_pretrained
    if not args.model.teacher or not path or path.startswith(("hf-hub:", "local-dir:")):
        return path or None
    require_file(path, "teacher checkpoint")
    return file_sha256(path)


def check_epochs_left(args: RunArguments, checkpoint: str) -> None:
    """A resumed run may train longer than the checkpoint's run planned, not stop before where it got to."""
    trained = trained_epochs(checkpoint)
    planned = training_epochs(args.recipe, args.training.num_train_epochs)
    if args.training.max_steps <= 0 and trained > planned + 1e-9:
        cooldown = planned - args.training.num_train_epochs
        raise ValueError(f"{checkpoint} has already trained {trained:g} epochs, more than --epochs "
                         f"{args.training.num_train_epochs:g} plans; pass --epochs {math.ceil(trained - cooldown)} "
                         f"or more")


def find_resume_checkpoint(args: RunArguments, identity: dict[str, Any]) -> str | None:
    """--resume: the newest complete checkpoint in --output_dir (or --resume_from_checkpoint PATH), which must
    come from a run of the same models, distiller and settings, and leave epochs to train."""
    output_dir = args.training.output_dir
    checkpoint = args.training.resume_from_checkpoint
    if not checkpoint and args.recipe.resume:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {output_dir} (a run saved "
                                    f"without checkpoints, or stopped before its first); start it again with "
                                    f"--overwrite_output_dir")
    if not checkpoint:
        return None
    try:
        ignored = check_resumable(checkpoint, identity, args.recipe.resume_ignore_changes)
        check_epochs_left(args, str(checkpoint))
        verify_checkpoint(checkpoint)
    except DamagedCheckpointError as error:
        raise DamagedCheckpointError(f"cannot resume from {checkpoint}: {error}; "
                                     f"{_intact_alternative(Path(checkpoint), identity, args)}") from error
    if ignored:
        logger.warning("--resume-ignore-changes: continuing %s with this run's settings (%s)", checkpoint,
                       "; ".join(ignored))
    return str(checkpoint)


def _intact_alternative(damaged: Path, identity: dict[str, Any], args: RunArguments) -> str:
    """What to resume from instead of the `damaged` checkpoint: the newest other complete checkpoint beside it
    that passes the resume's checks, or starting afresh."""
    others = [path for path in checkpoint_folders(damaged.parent) if is_complete(path) and path.name != damaged.name]
    for other in reversed(others):
        try:
            check_resumable(other, identity, args.recipe.resume_ignore_changes)
            verify_checkpoint(other)
        except (ValueError, OSError):
            continue
        return (f"the newest intact checkpoint is {other}: continue from it with --resume_from_checkpoint {other} "
                f"(the steps after it are trained again)")
    return (f"no other checkpoint in {damaged.parent} is intact: start the run again with "
            f"--overwrite_output_dir")


def identity_and_resume_checkpoint(args: RunArguments) -> tuple[dict[str, Any], str | None]:
    """This run's identity, which every checkpoint it saves records, and the checkpoint it continues from
    (None: it starts afresh)."""
    identity = args.run_identity(teacher_weights_id(args))
    return identity, find_resume_checkpoint(args, identity)


# ---- resuming mid-epoch exactly ----

class ExactResume:
    """The RNG bookkeeping of an exact mid-epoch resume, for the trainer that owns it: it hands over the
    training order (`track`) and collate function (`recording_collate`) it builds, calls `save` with each
    checkpoint and `resuming_from` when it loads one, and asks `before_batch_fetch` and `skips_trainer_rng_load`
    where transformers fetches batches and restores its RNG. `load_trainer_rng` is transformers' own restore of a
    checkpoint's RNG (`Trainer._load_rng_state`)."""

    def __init__(self, args: TrainingArguments, load_trainer_rng: Callable[[str], None]):
        self.args = args
        self.load_trainer_rng = load_trainer_rng
        # Set by a checkpoint load; still set when the first batch is fetched only if transformers did not
        # restore the RNG at an epoch start, that is when the resume is mid-epoch.
        self._resumed_from: str | None = None
        self._rng_before_next_fetch: dict[str, Any] | None = None
        self._rng_before_latest_fetch: dict[str, Any] | None = None
        self._restore_before_first_fetch: dict[str, Any] | None = None
        self._restore_after_first_fetch: str | None = None
        self._skip_next_rng_load = False

    @property
    def tracks_fetch_rng(self) -> bool:
        # Worker processes draw with their own generators, which no checkpoint captures.
        return self.args.dataloader_num_workers == 0

    def track(self, order: EpochSampler | StreamedTrainingSet) -> None:
        """Record the RNG state as each pass over the training order starts."""
        if self.tracks_fetch_rng:
            order.on_pass_start = self._on_pass_start

    def recording_collate(self, collate: Callable) -> Callable:
        """`collate`, recording the RNG state each training batch is drawn in."""
        if not self.tracks_fetch_rng:
            return collate

        def training_collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = collate(examples)
            if RESUME_SKIPPED in batch:
                return batch  # a batch of a resumed stream that is dropped unread: it draws nothing
            self._rng_before_latest_fetch = self._rng_before_next_fetch
            if self._restore_after_first_fetch is not None:
                self.load_trainer_rng(self._restore_after_first_fetch)
                self._restore_after_first_fetch = None
            self._rng_before_next_fetch = rng_snapshot()
            return batch

        return training_collate

    def save(self, folder: str) -> None:
        """Write the RNG state of the batch drawn ahead into the checkpoint `folder`."""
        if self._rng_before_latest_fetch is not None:
            torch.save(self._rng_before_latest_fetch,
                       os.path.join(folder, FETCH_RNG_FILE.format(rank=self.args.process_index)))

    def resuming_from(self, checkpoint: str) -> None:
        self._resumed_from = checkpoint

    def before_batch_fetch(self) -> None:
        """On the first fetch of a mid-epoch resume: arrange to restore the saved states around the next batch."""
        if self._resumed_from is None:
            return
        path = os.path.join(self._resumed_from, FETCH_RNG_FILE.format(rank=self.args.process_index))
        if self.tracks_fetch_rng and os.path.isfile(path):
            self._restore_before_first_fetch = torch.load(path, weights_only=True)
            self._restore_after_first_fetch = self._resumed_from
            self._skip_next_rng_load = True
        self._resumed_from = None

    def skips_trainer_rng_load(self) -> bool:
        """Whether transformers' restore of the checkpoint's RNG is to be skipped: `recording_collate` restores
        it right after the batch drawn ahead instead."""
        self._resumed_from = None
        skip = self._skip_next_rng_load
        self._skip_next_rng_load = False
        return skip

    @staticmethod
    @contextlib.contextmanager
    def rng_unchanged() -> Iterator[None]:
        """Leave the global generators as they were: evaluation draws from them (the loader's base seed), and
        training that does not depend on when it evaluates lets a resumed run, which does not repeat an
        evaluation that followed its checkpoint, draw what the uninterrupted run drew."""
        state = rng_snapshot()
        try:
            yield
        finally:
            restore_rng(state)

    def _on_pass_start(self) -> None:
        if self._restore_before_first_fetch is not None:
            restore_rng(self._restore_before_first_fetch)
            self._restore_before_first_fetch = None
        self._rng_before_next_fetch = rng_snapshot()
