"""Run one theory experiment and save its numbers and figure.

Each experiment ``name`` in :data:`EXPERIMENTS` writes
``<out_dir>/theory_<name>.json`` (all measured numbers) and
``<out_dir>/theory_<name>.png``; the figure depends on the JSON only
(:mod:`ntkd.theory.plots`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ntkd import _io

EXPERIMENTS = ("linear", "variance", "knowledge")


def run_experiment(
    name: str, out_dir: str | Path = "figures", *, quick: bool = False, seed: int = 0
) -> dict:
    """Runs ``ntkd.theory.<name>.run_experiment`` and saves its JSON and figure.

    Args:
      name: one of ``linear``, ``variance``, ``knowledge``.
      out_dir: folder for ``theory_<name>.json`` and ``theory_<name>.png``.
      quick: tiny sizes (seconds), for tests and CI.
      seed: master seed.

    Returns:
      The results dict that was written.
    """
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown theory experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}"
        )
    from ntkd.theory.plots import PLOTTERS

    module = importlib.import_module(f"ntkd.theory.{name}")
    results = module.run_experiment(quick=quick, seed=seed)
    out_dir = Path(out_dir)
    _io.write_json(out_dir / f"theory_{name}.json", results)
    PLOTTERS[name](results, out_dir / f"theory_{name}.png")
    return results
