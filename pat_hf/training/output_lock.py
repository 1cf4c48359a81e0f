"""A run holds its --output_dir: two runs started into one folder would mix their args.yaml, checkpoints and
student.

The lock is the file `OUTPUT_DIR/.pat_hf.lock`, created with O_CREAT|O_EXCL (so of two starts racing, exactly
one creates it) and holding the holder's pid, host, start time and command. It is taken by the first process of
a run before the output folder's contents are checked (a second start is then told who holds the folder, not
that it holds a run), and removed when the run ends, however it ends (`finally`, and atexit for an exit that
skips it); an output folder created only to hold the lock goes with it, so a refused start leaves nothing.
A lock left by a run that was killed is stale when its host is this one and its pid is no longer alive: it is
taken over, with a log line. A lock of another host cannot be tested from here and is refused, saying how to
remove it if that run is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from pat_hf.training.run_dir import check_writable

logger = logging.getLogger(__name__)

TAKEOVER_TIMEOUT_SECONDS = 10
LOCK_FILE = ".pat_hf.lock"


class OutputDirLockedError(OSError):
    """--output_dir is held by another run."""


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        return True
    return True


def _read(path: Path) -> tuple[str, dict[str, Any] | None]:
    """The lock file's text and its holder (None when the text is not a holder: a lock being written now, or
    a damaged one)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "", None
    try:
        holder = json.loads(text)
    except ValueError:
        return text, None
    return text, holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"({holder.get('command', '?')})")


class OutputDirLock:
    """The lock of one run on `output_dir`; `release` removes it (once, and only if it is still this run's)."""

    def __init__(self, path: Path, token: str, created_folders: list[Path]):
        self.path = path
        self.token = token
        self.created_folders = created_folders

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike, command: list[str] | None = None) -> OutputDirLock:
        """Take the lock of `output_dir` (creating the folder) for the run of `command` (this process's command
        line if None), or raise OutputDirLockedError naming the holder."""
        output_dir = Path(output_dir).absolute()
        created = []
        missing = output_dir
        while not missing.exists():
            created.append(missing)
            missing = missing.parent
        os.makedirs(output_dir, exist_ok=True)
        path = output_dir / LOCK_FILE
        token = uuid.uuid4().hex
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join(command or [os.path.basename(sys.argv[0]), *sys.argv[1:]]), "token": token}
        lock = cls(path, token, created)
        try:
            while True:
                try:
                    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    break
                except FileExistsError:
                    lock._take_over_if_stale(output_dir)  # raises unless the lock was stale and is gone now
            with os.fdopen(descriptor, "w") as f:
                f.write(json.dumps(holder))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            lock._remove_created_folders()
            raise
        atexit.register(lock.release)
        return lock

    def _take_over_if_stale(self, output_dir: Path) -> None:
        text, holder = _read(self.path)
        if not text and not self.path.exists():
            return  # released in the meantime: try again
        if holder is None:
            raise OutputDirLockedError(
                f"--output_dir {output_dir} holds a lock file that names no run ({self.path}: a run starting this "
                f"very moment, or a damaged file): if no run is using the folder, delete {self.path}")
        here = socket.gethostname()
        if holder.get("host") != here:
            raise OutputDirLockedError(
                f"--output_dir {output_dir} is in use by another run: {_describe(holder)}; wait for it to end or "
                f"choose another --output_dir (if that run is gone, delete {self.path})")
        if _pid_alive(holder["pid"]):
            raise OutputDirLockedError(
                f"--output_dir {output_dir} is in use by another run: {_describe(holder)}; wait for it to end or "
                f"choose another --output_dir (if that process is not a pat-hf run, delete {self.path})")
        # One start at a time removes a stale lock (a mutex file beside it), and only if the lock still holds what
        # was judged stale: starts racing past that point then meet O_EXCL, which lets exactly one create it.
        mutex = self.path.with_name(f"{LOCK_FILE}.takeover")
        try:
            descriptor = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if time.time() - _mtime(mutex) > TAKEOVER_TIMEOUT_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    mutex.unlink()  # left by a start that died while taking over
            time.sleep(0.05)
            return
        os.close(descriptor)
        try:
            current, _ = _read(self.path)
            if current == text:
                self.path.unlink()
                logger.warning("--output_dir %s: taking over the lock of a run that is gone (%s)", output_dir,
                               _describe(holder))
        finally:
            mutex.unlink()

    def release(self) -> None:
        atexit.unregister(self.release)
        _, holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._remove_created_folders()

    def _remove_created_folders(self) -> None:
        """Remove the folders acquiring created, if they are still empty: a start refused before it wrote
        anything leaves no trace."""
        for folder in self.created_folders:
            try:
                folder.rmdir()
            except OSError:
                return
        self.created_folders = []


def _shared_outcome(training: TrainingArguments, error: str | None) -> str | None:
    """Under torch.distributed: the first process's `error` (or None), handed to every process."""
    import torch.distributed as dist

    if training.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def hold_output_dir(training: TrainingArguments, command: list[str] | None = None) -> Iterator[None]:
    """Hold `training.output_dir` while the block runs (the first process takes the lock for all); `command`:
    the run's command line, which a refused second start is shown."""
    check_writable(training.output_dir)
    lock, error = None, None
    if training.process_index == 0:
        try:
            lock = OutputDirLock.acquire(training.output_dir, command)
        except OSError as refusal:
            error = refusal
    # Every process learns the first one's outcome, so that all stop together when it could not take the lock.
    message = _shared_outcome(training, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise OutputDirLockedError(message)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
