"""Writes that a kill or a full disk can interrupt without leaving a half-written file or folder behind.

Everything is written under a temporary `*.partial` name, flushed to the disk (fsync), and only then renamed to
its final name, which the file system does atomically: a reader sees the old version or the new one, never a
mix. A failed write removes its `*.partial` again. The libraries that write checkpoints report a full disk in
their own ways (an OSError; safetensors' `SafetensorError`; torch's zip writer a RuntimeError):
`write_failure_reason` recognises each.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

PARTIAL_SUFFIX = ".partial"
# torch.save's zip writer fails with a RuntimeError from its C++ writer; only the writer's own names it.
_TORCH_WRITER_FAILURE = re.compile(r"PytorchStreamWriter|inline_container")
_OS_ERROR_NUMBER = re.compile(r"os error (\d+)")


# Free space under which a disk counts as full when a writer's error does not say why it failed.
_FULL_DISK_BYTES = 1 << 20


def write_failure_reason(error: BaseException, folder: str | os.PathLike | None = None) -> str | None:
    """Why a write into `folder` failed, in words ("No space left on device"), if `error` is a failed write;
    else None. Call it before removing what was written: torch's writer does not name the cause, so a disk left
    (nearly) full names it."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, SafetensorError):
        number = _OS_ERROR_NUMBER.search(str(error))
        return os.strerror(int(number.group(1))) if number else f"safetensors could not write: {error}"
    if isinstance(error, RuntimeError) and _TORCH_WRITER_FAILURE.search(str(error)):
        with contextlib.suppress(OSError):
            if folder is not None and shutil.disk_usage(folder).free < _FULL_DISK_BYTES:
                return os.strerror(errno.ENOSPC)
        return f"torch could not write ({' '.join(str(error).split())[:160]}; is the disk full?)"
    return None


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or deleted in it) to the disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file below `folder`, and the folders themselves, to the disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_folder(root)


def publish_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Flush a fully written `staging` folder and rename it to `final`. A `final` already there is moved
    aside first and deleted once the new one is in place (a kill in between leaves both as `*.partial`)."""
    fsync_tree(staging)
    final = Path(final)
    replaced = partial_path(final.with_name(final.name + ".replaced"))
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    fsync_folder(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


@contextlib.contextmanager
def cleaned_up_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Remove `path` (a file or folder being written) if the block fails, then let the error through."""
    try:
        yield
    except BaseException:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` in one step: a reader sees the old content or the new one."""
    partial = partial_path(path)
    with cleaned_up_on_failure(partial):
        with open(partial, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    fsync_folder(Path(path).parent)


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the `*.partial` leftovers of writes that a kill interrupted."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for path in Path(folder).iterdir():
        if path.name.endswith(PARTIAL_SUFFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
