"""Study presets. Each module's docstring holds the exact command and its runtime.

    >>> from ntkd.configs import get_config
    >>> cfg = get_config("mnist1d", quick=True)
"""

from __future__ import annotations

import importlib

from ntkd.study import StudyConfig

PRESETS = ("mnist1d", "digits", "cifar10", "cifar100")


def get_config(name: str = "mnist1d", *, quick: bool = False) -> StudyConfig:
    """The study preset ``name``; ``quick`` shrinks it to a CI-sized smoke run."""
    if name not in PRESETS:
        raise ValueError(f"no study preset for dataset {name!r}; presets: {', '.join(PRESETS)}")
    return importlib.import_module(f"ntkd.configs.{name}").get_config(quick=quick)


def standard_regimes(*, early_stop_epoch: int) -> list[dict]:
    """The six student regimes of SPEC §4 / the distillation table."""
    return [
        {"name": "no-KD", "regime": "none"},
        {"name": "offline τ=1", "regime": "offline", "temperature": 1.0},
        {"name": "offline τ=4", "regime": "offline", "temperature": 4.0},
        {"name": "early-stopped τ=1", "regime": "early_stopped", "teacher_epoch": early_stop_epoch,
         "temperature": 1.0},
        {"name": "online τ=1", "regime": "online", "temperature": 1.0},
        {"name": "online τ=4", "regime": "online", "temperature": 4.0},
    ]
