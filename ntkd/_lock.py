"""Exclusive locks on run and study folders.

A process that writes a run or study folder holds ``fcntl.flock`` on the
folder's ``.ntkd.lock`` for as long as it writes there; the file also holds
the holder's PID so that a second process can say who is using the folder.
The kernel drops a ``flock`` when its process dies, however it dies, so a lock
file left by a killed run is not a lock: the next run takes it over.

The lock is per process: a process that already holds a folder's lock may
take it again (a notebook re-running a cell), and the folder is released when
the last holder releases it. It protects against other processes, not
against threads of the same process.

Example:
    >>> with lock_folder("runs/teacher"):
    ...     ...  # write config.json, checkpoints, history.json
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

LOCK_NAME = ".ntkd.lock"

_held: dict[str, list] = {}  # lock file path -> [fd, holders]
_mutex = threading.Lock()


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock; the message names its PID."""


class FolderLock:
    """A held folder lock; release it with :meth:`release` or a ``with`` block."""

    def __init__(self, key: str, folder: Path):
        self._key, self.folder, self._released = key, folder, False

    def release(self) -> None:
        """Releases this hold (idempotent); the lock goes when no hold is left."""
        if self._released:
            return
        self._released = True
        with _mutex:
            entry = _held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                os.close(entry[0])  # closing the descriptor drops the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text:
            return str(int(text))
    return "unknown"


def lock_folder(folder: str | os.PathLike, *, what: str = "run folder") -> FolderLock:
    """Takes the exclusive lock of ``folder`` (created if missing).

    Args:
        folder: the run or study folder.
        what: how the folder is named in the error message.

    Returns:
        A :class:`FolderLock`; hold it while writing the folder.

    Raises:
        FolderInUseError: another live process holds the lock.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    with _mutex:
        if key in _held:
            _held[key][1] += 1
            return FolderLock(key, folder)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise FolderInUseError(
                    f"{what} {folder} is in use by PID {pid} (it holds {path}); wait for that process to "
                    "finish or stop it, or use another folder"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # Someone may have deleted the lock file between our open and flock; a lock on
            # an unlinked file excludes no one, so lock the file that is there now instead.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = [fd, 1]
    return FolderLock(key, folder)
