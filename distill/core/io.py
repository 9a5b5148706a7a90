"""Atomic writes (every file or folder a user gets appears whole or not at all: temp + rename), a full disk as a
one-line error, and the run-folder lock that stops two processes from writing one run."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dstudio.distill.core.errors import UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write ran out of space (or quota): the previous good file is kept and the temp file removed."""


class RunLockedError(UserError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def atomic_path(path: str | Path, is_dir: bool = False):
    """Yield a temporary sibling of `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) if is_dir else \
        path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if is_dir:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise _disk_full(path, "the previous one is kept" if path.exists() else "nothing was written") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def _disk_full(path: Path, kept: str) -> DiskFullError:
    return DiskFullError(f"no space left on the device of '{path.parent}' while writing {path.name} ({kept}); "
                         f"free some space and rerun")


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log; a full disk is a one-line error (the lines before it are whole)."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise _disk_full(path, "the lines before are kept") from None


def drop_stale_temps(path: str | Path) -> None:
    """Remove the temp files of writes to `path` that were killed half-way (they are never read)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)


def save_torch(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_image(image, path: str | Path) -> None:
    """Save a PIL image atomically (the format comes from the final suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def check_writable(path: str | Path) -> Path:
    """Fail early, before any work, when an output location cannot be created or written."""
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if (path.exists() and not path.is_dir()) or not os.access(probe, os.W_OK):
        raise PermissionError(f"output '{path}' is not a writable folder")
    return path


@contextlib.contextmanager
def run_folder_lock(folder: str | Path):
    """Hold an exclusive lock on run folder `folder` (created if missing) for the block, or raise RunLockedError.

    The lock is an fcntl.flock on the folder itself: no lock file is written, and the kernel releases it when
    the holder exits, however it exits. `dstudio app` jobs and command-line runs take the same lock.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"run folder '{folder}' is being written by another dstudio process; wait for it "
                                 f"to finish or use another --out") from None
        yield folder
    except BaseException:
        if created and not any(folder.iterdir()):  # a run that failed before writing anything leaves no folder
            folder.rmdir()
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def run_folder_locked(folder: str | Path) -> bool:
    """Whether another process holds `folder`'s run lock (a probe that takes and drops it at once)."""
    if not Path(folder).is_dir():
        return False
    try:
        with run_folder_lock(folder):
            return False
    except RunLockedError:
        return True
