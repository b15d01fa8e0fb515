"""`ntkd.tune_host_memory()` makes glibc reuse freed host memory (ntkd/_hostmem.py); it is
an opt-in (the CLI, or NTKD_TUNE_MALLOC=1 at import), never a side effect of `import ntkd`.

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
if sys.argv[1] == "call":
    ntkd.tune_host_memory()
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


PAGES = (256 << 20) // 4096


def _probe(tune: str | None, *, call: bool = False, **extra_env) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "NTKD_TUNE_MALLOC"}
    env.update(extra_env, **({} if tune is None else {"NTKD_TUNE_MALLOC": tune}))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "call" if call else "import"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.parametrize("tune, call", [("1", False), (None, True)], ids=["env", "call"])
def test_freed_buffers_are_reused_without_page_faults(tune, call):
    tuned, faults = _probe(tune, call=call)
    assert tuned
    assert faults < PAGES // 100, faults


@pytest.mark.parametrize("tune, call", [(None, False), ("0", True)], ids=["import", "opt-out"])
def test_without_opt_in_glibc_keeps_its_defaults(tune, call):
    """A plain `import ntkd` changes nothing; NTKD_TUNE_MALLOC=0 makes the call a no-op."""
    tuned, faults = _probe(tune, call=call)
    assert not tuned
    # untouched glibc unmaps the 256 MiB chunk on free: its pages fault again
    # (fewer with transparent huge pages, still far more than zero)
    assert faults > 100, faults


def test_environment_equivalent_has_the_same_effect():
    # what the benchmark's --nt-tuned-malloc hands neural-tangents' process
    from ntkd._hostmem import GLIBC_TUNABLES

    tuned, faults = _probe(None, GLIBC_TUNABLES=GLIBC_TUNABLES)
    assert not tuned
    assert faults < PAGES // 100, faults


def test_the_command_line_tunes_before_any_jax_work():
    env = {k: v for k, v in os.environ.items() if k != "NTKD_TUNE_MALLOC"}
    code = (
        "import sys; from ntkd import _hostmem, cli; cli.main(sys.argv[1:]); print(_hostmem.TUNED)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "figures", "--to", os.devnull, os.devnull],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split()[-1] == "True", out.stderr
