"""Checkpoint folders that a kill or a full disk can never leave half-usable.

`StagedCheckpoints`, owned by the trainer, writes each checkpoint as `checkpoint-N.partial/checkpoint-N`: the
Trainer's checkpoint plus what pat-hf adds (the distiller's per-process state, the state of every
`CheckpointStateCallback`, the exact-resume RNG). Once every process has written all of it, it is flushed to the
disk and renamed to `checkpoint-N`; `pat_hf_checkpoint.json`, the last file written (atomically), marks it
complete. Only then are older checkpoints rotated out; a failed write (an OSError, or the error type of the
library writing: safetensors, torch) removes the whole staging folder at once and leaves the earlier checkpoints.
`--resume` only ever picks a complete checkpoint, and folders are deleted marker first
(`remove_folder_marker_first`), so that a kill mid-deletion leaves an incomplete folder, never a
complete-looking broken one. The marker also records what the run trained (models, distiller, teacher weights,
data, recipe): resuming with other settings fails naming each difference. And it lists every file of the
checkpoint with its size: a resume first checks that each is there, whole and loadable (`verify_checkpoint`),
since the Trainer skips an optimizer, scheduler or RNG file it does not find and the run would silently stop
being exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from pat_hf.models.safetensors_state import safetensors_ready
from pat_hf.training.atomic import (
    partial_path,
    publish_folder,
    remove_stale_partials,
    write_failure_reason,
    write_text_atomically,
)

COMPLETE_MARKER = "pat_hf_checkpoint.json"
PROCESS_STATE_FILE = "distiller_state_rank{rank}.safetensors"
# The marker's list of the checkpoint's files (relative path -> size in bytes).
FILES_KEY = "files"
# What every checkpoint holds, for a marker written before the file list was recorded.
UNLISTED_CHECKPOINT_FILES = (TRAINER_STATE_NAME, SAFE_WEIGHTS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoint-N` folder in `output_dir`, complete or not, by increasing N."""
    if not os.path.isdir(output_dir):
        return []
    found = [path for path in Path(output_dir).iterdir() if path.is_dir() and _step(path) is not None]
    return sorted(found, key=_step)


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    complete = [path for path in checkpoint_folders(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def mark_complete(folder: str | os.PathLike, identity: dict[str, Any]) -> None:
    """Write the completion marker last and atomically: a reader sees all of it or none of it."""
    write_text_atomically(Path(folder) / COMPLETE_MARKER, json.dumps(identity, indent=2, sort_keys=True))


class DamagedCheckpointError(ValueError):
    """A complete-looking checkpoint with a file missing or damaged: resuming from it would not be exact."""


def read_identity(folder: str | os.PathLike) -> dict[str, Any]:
    check_file(folder, COMPLETE_MARKER)
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())


def checkpoint_files(folder: str | os.PathLike) -> dict[str, int]:
    """Every file below `folder` but the marker, by path relative to it, with its size."""
    folder = Path(folder)
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    files.pop(COMPLETE_MARKER, None)
    return dict(sorted(files.items()))


def _load_problem(path: Path) -> str | None:
    """Why `path` does not load as a resume loads it (None: it loads). JSON is parsed, safetensors' header read
    (it checks that the data cover the file), and `.pt`/`.pth` loaded as transformers loads them; other files
    (training_args.bin, which no resume reads) are not opened."""
    suffix = path.suffix
    # Any exception is the file's fault here: each library reports damage with its own error type.
    try:
        if suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif suffix in (".pt", ".pth"):
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        kind = {".json": "JSON", ".safetensors": "safetensors"}.get(suffix, "PyTorch")
        return f"not a readable {kind} file: {' '.join(str(error).split())[:160]}"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Check that every file the checkpoint's marker lists is there with its recorded size and loads; raise
    DamagedCheckpointError naming the first that is not. A marker without the list (an older pat-hf) is
    checked for the files every checkpoint holds."""
    folder = Path(folder)
    listed = read_identity(folder).get(FILES_KEY)
    expected: dict[str, int | None] = listed if listed is not None else dict.fromkeys(UNLISTED_CHECKPOINT_FILES)
    for name, size in expected.items():
        check_file(folder, name, size)


def check_file(folder: str | os.PathLike, name: str, size: int | None = None) -> None:
    """Raise DamagedCheckpointError, naming the file, if `name` in the checkpoint `folder` is missing, not of its
    recorded `size`, or does not load."""
    path = Path(folder) / name
    if not path.is_file():
        raise DamagedCheckpointError(f"{name} is missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DamagedCheckpointError(f"{name} is damaged ({actual} bytes, {size} when it was saved)")
    damage = _load_problem(path)
    if damage:
        raise DamagedCheckpointError(f"{name} is damaged ({damage})")


# The identity keys that no setting can override: a checkpoint of other models or another distiller does not load.
RUN_KEYS = ("model", "model_kwargs", "teacher", "teacher_kwargs", "distiller")


def _differences(saved: dict[str, Any], identity: dict[str, Any], keys) -> list[str]:
    # A key the checkpoint lacks was not recorded by the pat-hf that wrote it: nothing to compare.
    return [f"{key}: checkpoint {saved[key]!r}, this run {identity[key]!r}"
            for key in keys if key in saved and key in identity and saved[key] != identity[key]]


def check_resumable(folder: str | os.PathLike, identity: dict[str, Any], ignore_changes: bool = False) -> list[str]:
    """Refuse an incomplete checkpoint, one saved by a run of other models or another distiller, and, unless
    `ignore_changes`, one saved with other settings. Returns the differences that were ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {folder}")
    if not is_complete(folder):
        raise ValueError(f"{folder} is incomplete (no {COMPLETE_MARKER}: its save was interrupted); resume from "
                         f"an earlier checkpoint")
    saved = read_identity(folder)
    differences = _differences(saved, identity, RUN_KEYS)
    if differences:
        raise ValueError(f"{folder} belongs to another run ({'; '.join(differences)}); resume with the same "
                         f"models and distiller, or choose another --output_dir")
    changes = _differences(saved, identity, [key for key in identity if key not in RUN_KEYS])
    if changes and not ignore_changes:
        raise ValueError(f"{folder} was trained with other settings ({'; '.join(changes)}); resume with the same "
                         f"settings, or pass --resume-ignore-changes to continue with this run's")
    return changes


def trained_epochs(folder: str | os.PathLike) -> float:
    """The epochs a checkpoint's run had trained when it was saved."""
    check_file(folder, TRAINER_STATE_NAME)
    return float(json.loads((Path(folder) / TRAINER_STATE_NAME).read_text()).get("epoch") or 0.0)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def staging_root(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is published: `checkpoint-N.partial/`."""
    return partial_path(Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}")


def publish_checkpoint(staged: str | os.PathLike, identity: dict[str, Any]) -> Path:
    """Mark a fully written staged checkpoint complete, listing its files, flush it and rename it to its final
    name."""
    staged = Path(staged)
    final = staged.parent.parent / staged.name
    mark_complete(staged, {**identity, FILES_KEY: checkpoint_files(staged)})
    publish_folder(staged, final)
    staged.parent.rmdir()
    return final


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None, protected: str | None = None) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints (and `protected`, the best one). Incomplete
    folders older than the newest complete checkpoint are leftovers of interrupted saves and go too."""
    if keep is None or keep <= 0:
        return []
    folders = checkpoint_folders(output_dir)
    complete = [path for path in folders if is_complete(path)]
    if not complete:
        return []
    kept = {path.name for path in complete[-keep:]}
    if protected:
        kept.add(Path(protected).name)
    newest_step = _step(complete[-1])
    deleted = []
    for path in folders:
        if path.name not in kept and _step(path) <= newest_step:
            remove_folder_marker_first(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def remove_folder_marker_first(folder: str | os.PathLike, ignore_errors: bool = False) -> None:
    """Delete `folder`, its completion marker first: a kill mid-deletion must not leave a checkpoint that looks
    complete. `ignore_errors`: leave what cannot be deleted (rotation must not fail a training run over it)."""
    (Path(folder) / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=ignore_errors)


def save_process_state(folder: str | os.PathLike, rank: int, state: dict[str, torch.Tensor]) -> None:
    """A distiller's per-process state (PAT's feedback), one file per process; nothing when there is none."""
    if state:
        save_file(safetensors_ready({k: v.cpu() for k, v in state.items()}),
                  os.path.join(folder, PROCESS_STATE_FILE.format(rank=rank)))


def load_process_state(folder: str | os.PathLike, rank: int) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, PROCESS_STATE_FILE.format(rank=rank))
    return load_file(path) if os.path.isfile(path) else {}


class CheckpointStateCallback(TrainerCallback):
    """A callback whose state travels with the Trainer's checkpoints: written into every checkpoint before it is
    marked complete and read back on resume (transformers' own callback state export only round-trips JSON, not
    tensors)."""

    def save_to_checkpoint(self, folder: str, is_main_process: bool) -> None:
        raise NotImplementedError

    def load_from_checkpoint(self, folder: str) -> None:
        raise NotImplementedError


def save_callback_states(callbacks: Iterable[TrainerCallback], folder: str, is_main_process: bool) -> None:
    for callback in callbacks:
        if isinstance(callback, CheckpointStateCallback):
            callback.save_to_checkpoint(folder, is_main_process)


def load_callback_states(callbacks: Iterable[TrainerCallback], folder: str) -> None:
    for callback in callbacks:
        if isinstance(callback, CheckpointStateCallback):
            callback.load_from_checkpoint(folder)


def rng_snapshot() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, storable with `torch.save` and loadable with
    `torch.load(weights_only=True)`."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, gauss),
             "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost permissions); the earlier ones are intact."""


class StagedCheckpoints:
    """Writes the trainer's checkpoints under `checkpoint-N.partial/`, publishes each as `checkpoint-N` with the
    run's `run_identity` in its marker once every process has written it, and rotates out older ones."""

    def __init__(self, args: TrainingArguments, accelerator: Accelerator, run_identity: dict[str, Any]):
        self.args = args
        self.accelerator = accelerator
        self.run_identity = dict(run_identity)
        # Where the Trainer writes its checkpoint while one is being saved (its output folder otherwise).
        self.staging_output_dir: str | None = None

    def save(self, state: TrainerState, run_dir: str, write: Callable[[str], None]) -> None:
        """Save the checkpoint of `state.global_step` in `run_dir`: every process calls `write(folder)` with
        the staged checkpoint folder (and `staging_output_dir` set), then it is published and older ones rotated."""
        step = state.global_step
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        staging = staging_root(run_dir, step)
        folder = str(staging / os.path.basename(final))
        if self.args.should_save:
            remove_stale_partials(run_dir)
            if os.path.isdir(final):
                # Left by a run that was interrupted after this step and resumed from an earlier checkpoint.
                remove_folder_marker_first(final)
        self.accelerator.wait_for_everyone()
        try:
            self.staging_output_dir = str(staging)
            try:
                write(folder)
            finally:
                self.staging_output_dir = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._record_best_checkpoint(state, run_dir, folder)
                publish_checkpoint(folder, {**self.run_identity, "global_step": step})
        except BaseException as error:
            reason = write_failure_reason(error, run_dir)
            # Whatever stopped the save (a full disk, Ctrl-C, a failed process): no half-written folder stays.
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if reason is None:
                raise
            if latest_complete_checkpoint(run_dir) is None:
                raise CheckpointWriteError(
                    f"could not write {final}: {reason}; nothing of it was kept and the run has no earlier "
                    f"checkpoint: free space (or restore write access) and start it again with "
                    f"--overwrite_output_dir") from error
            raise CheckpointWriteError(
                f"could not write {final}: {reason}; nothing of it was kept and the earlier checkpoints are "
                f"intact: free space (or restore write access) and continue with --resume") from error
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, state.best_model_checkpoint)

    @staticmethod
    def _record_best_checkpoint(state: TrainerState, run_dir: str, folder: str) -> None:
        """The Trainer looked for the best checkpoint beside the staged one; point it at the published name."""
        best_step = state.best_global_step
        if not best_step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == state.global_step or os.path.isdir(best):
            state.best_model_checkpoint = best
            state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
