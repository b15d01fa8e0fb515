"""`import ntkd` makes glibc reuse freed host memory (ntkd/_hostmem.py).

Oracle: the kernel's minor-page-fault counter. Re-touching a freed and
re-allocated 256 MiB buffer faults every 4 KiB page again under glibc's
defaults (the chunk is mmap'd and unmapped on free) and not at all once the
allocator keeps freed memory.
"""

import ctypes
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="the allocator settings are glibc-only",
)

PROBE = """
import ctypes, resource, sys
import ntkd
from ntkd import _hostmem
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 256 << 20

def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)

touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(_hostmem.TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(tune: str, **extra_env) -> tuple[bool, int]:
    env = dict(os.environ, NTKD_TUNE_MALLOC=tune, **extra_env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_buffers_are_reused_without_page_faults():
    tuned, faults = _probe("1")
    assert tuned
    pages = (256 << 20) // 4096
    assert faults < pages // 100, faults


def test_opt_out_leaves_glibc_defaults():
    tuned, faults = _probe("0")
    assert not tuned
    # untouched glibc unmaps the 256 MiB chunk on free: its pages fault again
    # (fewer with transparent huge pages, still far more than zero)
    assert faults > 100, faults


def test_environment_equivalent_has_the_same_effect():
    # what the benchmark's --nt-tuned-malloc hands neural-tangents' process
    from ntkd._hostmem import GLIBC_TUNABLES

    tuned, faults = _probe("0", GLIBC_TUNABLES=GLIBC_TUNABLES)
    assert not tuned
    assert faults < (256 << 20) // 4096 // 100, faults
