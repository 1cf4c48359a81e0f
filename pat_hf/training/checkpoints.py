"""Checkpoint folders that a kill can never leave half-usable.

A checkpoint is written as `checkpoint-N.partial/checkpoint-N`, flushed to the disk, and renamed to
`checkpoint-N` once every process has written all of it; `pat_hf_checkpoint.json`, the last file written
(atomically), marks it complete. `--resume` only ever picks a complete checkpoint, and rotation only deletes
checkpoints once a newer complete one exists (its marker first, so that a kill mid-deletion leaves an incomplete
folder, never a complete-looking broken one). The marker also records what the run trained (models,
distiller, teacher weights, data, recipe): resuming with other settings fails naming each difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pat_hf.training.atomic import partial_path, publish_folder, write_text_atomically

COMPLETE_MARKER = "pat_hf_checkpoint.json"
PROCESS_STATE_FILE = "distiller_state_rank{rank}.safetensors"
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


def read_identity(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())


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
    state = json.loads((Path(folder) / TRAINER_STATE_NAME).read_text())
    return float(state.get("epoch") or 0.0)


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
    """Mark a fully written staged checkpoint complete, flush it and rename it to its final name."""
    staged = Path(staged)
    final = staged.parent.parent / staged.name
    mark_complete(staged, identity)
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
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def save_process_state(folder: str | os.PathLike, rank: int, state: dict[str, torch.Tensor]) -> None:
    """A distiller's per-process state (PAT's feedback), one file per process; nothing when there is none."""
    if state:
        save_file({k: v.contiguous().cpu() for k, v in state.items()},
                  os.path.join(folder, PROCESS_STATE_FILE.format(rank=rank)))


def load_process_state(folder: str | os.PathLike, rank: int) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, PROCESS_STATE_FILE.format(rank=rank))
    return load_file(path) if os.path.isfile(path) else {}


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
