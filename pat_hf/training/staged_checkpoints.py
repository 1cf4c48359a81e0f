"""Checkpoints that appear under their name only when complete (pat_hf/checkpoints.py does the file work).

A Trainer mixin: the Trainer's checkpoint plus what `write_checkpoint_extras` adds is written under
`checkpoint-N.partial/` and published as `checkpoint-N`, flushed to the disk, once every process has written
everything; only then are older checkpoints rotated out. A failed write (a full disk) removes what it wrote and
leaves the earlier checkpoints.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pat_hf.training import checkpoints
from pat_hf.training.atomic import remove_stale_partials
from pat_hf.training.attributes import instead_of_method, temporarily


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost permissions); the earlier ones are intact."""


class StagedCheckpointTrainer(Trainer):
    run_identity: dict[str, Any]

    def check_before_checkpoint(self, step: int) -> None:
        """Raise to refuse the checkpoint of `step` (a model that is not finite)."""

    def write_checkpoint_extras(self, folder: str) -> None:
        """Write this process's further state into the staged checkpoint `folder`."""

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        self.check_before_checkpoint(step)
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        staging = checkpoints.staging_root(run_dir, step)
        folder = str(staging / os.path.basename(final))
        if self.args.should_save:
            remove_stale_partials(run_dir)
            if os.path.isdir(final):
                # Left by a run that was interrupted after this step and resumed from an earlier checkpoint.
                shutil.rmtree(final)
        self.accelerator.wait_for_everyone()
        try:
            with temporarily(self.args, "save_total_limit", None), \
                    instead_of_method(self, "_get_output_dir", lambda trial=None: str(staging)):
                super()._save_checkpoint(model, trial)
            self.write_checkpoint_extras(folder)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._record_best_checkpoint(run_dir, folder)
                checkpoints.publish_checkpoint(folder, {**self.run_identity, "global_step": step})
        except OSError as error:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointWriteError(
                f"could not write {final}: {error.strerror or error}; nothing of it was kept and the earlier "
                f"checkpoints are intact: free space (or restore write access) and continue with --resume") from error
        if self.args.should_save:
            checkpoints.rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _record_best_checkpoint(self, run_dir: str, folder: str) -> None:
        """The Trainer looked for the best checkpoint beside the staged one; point it at the published name."""
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
