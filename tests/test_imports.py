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
import ntkd, ntkd.plotting, ntkd.theory.plots, ntkd.cli, ntkd.study, ntkd.configs
from jax._src import xla_bridge
from ntkd import _hostmem
print(before, matplotlib.get_backend(), _hostmem.TUNED, xla_bridge.backends_are_initialized())
"""


def test_import_leaves_the_backend_and_the_allocator_alone():
    """No backend chosen, no mallopt, no JAX backend started (so the CLI tunes before JAX)."""
    env = {k: v for k, v in os.environ.items() if k != "NTKD_TUNE_MALLOC"}
    env["MPLBACKEND"] = "svg"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["svg", "svg", "False", "False"], out


def test_the_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    import ntkd

    assert ntkd.__version__ == version("ntkd")


def test_the_public_api_is_annotated():
    import inspect

    import ntkd

    missing = {}
    for name in ntkd.__all__:
        obj = getattr(ntkd, name)
        if not callable(obj):
            continue
        sig = inspect.signature(obj)
        gaps = {p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty}
        if sig.return_annotation is inspect.Signature.empty:
            gaps.add("return")
        if gaps:
            missing[name] = sorted(gaps)
    assert not missing, missing


def test_the_study_does_not_import_its_presets():
    """ntkd.configs builds StudyConfigs; ntkd.study must not import it back (no cycle)."""
    code = "import sys, ntkd.study; print('ntkd.configs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"], out.stdout
