"""Keep freed host memory in the process, so XLA:CPU buffers are not re-faulted.

XLA:CPU allocates every output and temporary buffer of an execution with
``malloc`` and frees it afterwards. glibc hands buffers above 32 MiB (and
those of its per-thread arenas) back to the kernel on ``free``, so the next
execution touches fresh pages: one page fault per 4 KiB. The eNTK's feature
blocks are hundreds of MiB, re-created for every block; on a 2-core CPU the
faults cost about a fifth of ResNet-20's structured feature pass (23.6 →
19.1 ms/example, 330 000 → 0 faults per 64-example block) and half of a
batched per-example weight-gradient matmul (52 → 112 GFLOP/s).

``tune()`` (public as ``ntkd.tune_host_memory()``) asks glibc, through
``mallopt``, for one arena, no ``mmap``'d chunks and no trimming, so freed
buffers are reused. The price: the process keeps its peak host memory until
it exits, which is why it is an opt-in that changes the whole process and not
something ``import ntkd`` does. The arena setting only reaches threads started
afterwards, so it must run before JAX creates its CPU client (its first
computation): the ``ntkd`` command line calls it first thing, a script or
notebook calls ``ntkd.tune_host_memory()`` before any JAX work, or sets
``NTKD_TUNE_MALLOC=1`` so that ``import ntkd`` does. ``NTKD_TUNE_MALLOC=0``
makes every call a no-op (the command line included); on a non-glibc platform
it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD = -1: never trim

GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=4611686018427387904"
)
"""The same settings as a ``GLIBC_TUNABLES`` environment value, for a process
that does not import ntkd (set before it starts; the threshold stands in for
"never")."""

TUNED = False
"""Whether ``tune()`` changed the allocator in this process."""


def requested_at_import() -> bool:
    """Whether ``NTKD_TUNE_MALLOC=1`` asks ``import ntkd`` to call :func:`tune`."""
    return os.environ.get("NTKD_TUNE_MALLOC") == "1"


def tune() -> bool:
    """Apply the allocator settings once; returns whether they are in effect.

    Call it before the first JAX computation (see the module docstring);
    ``NTKD_TUNE_MALLOC=0`` turns it into a no-op.
    """
    global TUNED
    if (
        TUNED
        or os.environ.get("NTKD_TUNE_MALLOC", "1") == "0"
        or not sys.platform.startswith("linux")
    ):
        return TUNED
    try:
        libc = ctypes.CDLL(None)
        _ = libc.gnu_get_libc_version  # glibc only: musl has no tunable mallopt
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    TUNED = all(
        mallopt(opt, val) == 1
        for opt, val in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
    )
    return TUNED
