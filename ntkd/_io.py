"""Atomic file writing: finished work is never half-written or lost.

Every result file goes through these helpers: the content is written to a
temporary file in the destination folder and moved into place with
``os.replace``, which is atomic on POSIX filesystems. An interrupted run
therefore leaves either the previous complete file or the new complete file
(and possibly a stale ``.<name>.*.tmp`` beside it, which
:func:`remove_stale_tmp` deletes). Files get the mode ``open()`` would give
them (0666 minus the umask), so a shared results folder stays readable.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _to_builtin(obj: Any) -> Any:
    """JSON fallback for NumPy/JAX scalars and arrays."""
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically writes ``data`` to ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that interrupted writes left in ``folder``.

    Only call it while no other process writes there (e.g. holding the
    folder's lock, :mod:`ntkd._lock`).

    Returns:
        The deleted paths.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically writes ``text`` (UTF-8) to ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically writes ``obj`` as indented JSON; NumPy values become lists/floats."""
    return write_text(path, json.dumps(obj, indent=2, default=_to_builtin) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it"
        ) from e


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Atomically writes a list of dict rows as CSV (columns in first-seen order)."""
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: _to_builtin(v) if isinstance(v, np.generic) else v for k, v in row.items()}
        )
    return write_text(path, buf.getvalue())


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Atomically writes arrays to an ``.npz`` file."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return write_bytes(path, buf.getvalue())
