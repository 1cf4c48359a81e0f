"""What --output_dir may hold when a run starts, and preparing it.

A folder that holds a run (finished or not, with checkpoints or without) is continued with --resume or
replaced with --overwrite_output_dir, never written over by accident; a path that cannot be written is
reported before any data is read or model built (`check_output_dir`, which writes nothing). Only once every
input has been checked does `start_output_dir` clear an old run and write args.yaml.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pat_hf.config.arguments import RunArguments
from pat_hf.training.atomic import PARTIAL_SUFFIX, remove_stale_partials, write_text_atomically
from pat_hf.training.checkpoints import remove_folder_marker_first

logger = logging.getLogger(__name__)

# What a run writes at the top of its output folder (besides checkpoint-N and *.partial leftovers). The lock
# of the run holding the folder (training/output_lock.py) is not among them: --overwrite_output_dir keeps it.
RUN_FILES = ("args.yaml", "trainer_state.json", "summary.csv", "train_results.json", "eval_results.json",
             "all_results.json")
RUN_FOLDERS = ("student", "runs")


def run_artefacts(output_dir: str | os.PathLike) -> list[Path]:
    """The files and folders of a pat-hf run in `output_dir`, by name."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for path in Path(output_dir).iterdir():
        name = path.name
        if (name in RUN_FILES and path.is_file()) or (name in RUN_FOLDERS and path.is_dir()) \
                or name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") or name.endswith(PARTIAL_SUFFIX):
            found.append(path)
    return sorted(found)


def _listing(paths: list[Path], shown: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    more = f", +{len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_writable(output_dir: str | os.PathLike) -> None:
    """Refuse an --output_dir that cannot be created or written."""
    path = Path(output_dir).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir}: {existing} is a file, not a folder; choose another "
                                 f"--output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == path else f"cannot be created: {existing}"
        raise PermissionError(f"--output_dir {output_dir} {what} not writable by this user; fix its "
                              f"permissions or choose another --output_dir")


def check_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run in `output_dir` unless told to continue it or to replace it."""
    check_writable(output_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output_dir and --overwrite_output_dir replaces it: "
                         "pass one of them")
    found = run_artefacts(output_dir)
    if not found or resume or overwrite:
        return
    has_checkpoints = any(p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") for p in found)
    if has_checkpoints:
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass --resume to continue that run, "
                              f"--overwrite_output_dir to replace it, or choose another --output_dir "
                              f"(found {_listing(found)})")
    raise FileExistsError(f"{output_dir} already holds a run; pass --overwrite_output_dir to replace it, or choose "
                          f"another --output_dir (found {_listing(found)})")


def clear_run(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the old run's files and folders from `output_dir` (--overwrite_output_dir); other files stay."""
    removed = run_artefacts(output_dir)
    for path in removed:
        if path.is_dir():
            remove_folder_marker_first(path)
        else:
            path.unlink()
    return removed


def start_output_dir(args: RunArguments) -> None:
    """Once every input is checked: clear the old run (--overwrite_output_dir) or what a kill left half-written,
    and write args.yaml (without the Hub token: TrainingArguments masks it)."""
    training = args.training
    with training.main_process_first(desc="preparing the output folder"):
        if training.process_index == 0:
            if training.overwrite_output_dir:
                removed = clear_run(training.output_dir)
                if removed:
                    logger.info("--overwrite_output_dir: removed %s", ", ".join(p.name for p in removed))
            remove_stale_partials(training.output_dir)  # writes that a kill interrupted
            os.makedirs(training.output_dir, exist_ok=True)
            write_text_atomically(os.path.join(training.output_dir, "args.yaml"),
                                  yaml.safe_dump(args.as_dict(), sort_keys=False))
