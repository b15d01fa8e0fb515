"""Importing ntkd changes nothing process-wide: no matplotlib backend, no allocator settings.

Oracle: a fresh interpreter whose matplotlib backend is set to a non-Agg one (``svg``)
before the imports, and ntkd's own record of whether it called ``mallopt``.
"""

import os
import subprocess
import sys

PROBE = """
import matplotlib
before = matplotlib.get_backend()
import ntkd, ntkd.plotting, ntkd.theory.plots
from ntkd import _hostmem
print(before, matplotlib.get_backend(), _hostmem.TUNED)
"""


def test_import_leaves_the_backend_and_the_allocator_alone():
    env = {k: v for k, v in os.environ.items() if k != "NTKD_TUNE_MALLOC"}
    env["MPLBACKEND"] = "svg"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["svg", "svg", "False"], out


def test_the_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    import ntkd

    assert ntkd.__version__ == version("ntkd")
