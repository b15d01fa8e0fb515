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


STANDARD_NAMES = {
    "none": "no-KD",
    "offline_t1": "offline τ=1",
    "offline_t4": "offline τ=4",
    "early_stopped_t1": "early-stopped τ=1",
    "online_t1": "online τ=1",
    "online_t4": "online τ=4",
}


def standard_criteria(**kwargs) -> list[dict]:
    """The paper's findings as pre-registered criteria on :func:`standard_regimes`
    (see :func:`ntkd.findings.paper_criteria`)."""
    from ntkd.findings import paper_criteria

    return paper_criteria(regimes=STANDARD_NAMES, **kwargs)


def capacity_regimes(
    students: dict[str, dict], *, seeds: list[int], temperature: float = 4.0
) -> list[dict]:
    """No-KD, offline and online KD at one τ for further students of the capacity-gap regression.

    Args:
        students: label → ``{"model": ..., "model_options": ...}``.
        seeds: their seeds.
        temperature: τ of the KD runs.
    """
    out = []
    for label, spec in students.items():
        base = {"student": label, "seeds": list(seeds), **spec}
        out += [
            {"name": f"no-KD · {label}", "regime": "none", **base},
            {
                "name": f"offline τ={temperature:g} · {label}",
                "regime": "offline",
                "temperature": temperature,
                **base,
            },
            {
                "name": f"online τ={temperature:g} · {label}",
                "regime": "online",
                "temperature": temperature,
                **base,
            },
        ]
    return out


def standard_regimes(*, early_stop_epoch: int) -> list[dict]:
    """The six student regimes of the distillation table: no-KD, offline KD at τ = 1 and 4,
    an early-stopped teacher at τ = 1, online KD at τ = 1 and 4."""
    return [
        {"name": "no-KD", "regime": "none"},
        {"name": "offline τ=1", "regime": "offline", "temperature": 1.0},
        {"name": "offline τ=4", "regime": "offline", "temperature": 4.0},
        {
            "name": "early-stopped τ=1",
            "regime": "early_stopped",
            "teacher_epoch": early_stop_epoch,
            "temperature": 1.0,
        },
        {"name": "online τ=1", "regime": "online", "temperature": 1.0},
        {"name": "online τ=4", "regime": "online", "temperature": 4.0},
    ]
