"""Safaryan, Peste & Alistarh (2023): KD as partial variance reduction.

Command (a few minutes on 2 shared CPU cores; ``--quick``: under a minute):

    PYTHONPATH=. python experiments/theory_variance.py --out figures

Equivalent CLI: ``ntkd theory variance --out figures``. Writes
``figures/theory_variance.json`` and ``figures/theory_variance.png``.
"""

import argparse

from ntkd.theory import run_experiment

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run_experiment("variance", args.out, quick=args.quick, seed=args.seed)
