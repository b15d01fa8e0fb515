"""Phuong & Lampert (2019): distillation of linear and deep linear students.

Command (about 3 minutes on 2 CPU cores; ``--quick``: about 10 s):

    PYTHONPATH=. python experiments/theory_linear.py --out figures

Equivalent CLI: ``ntkd theory linear --out figures``. Writes
``figures/theory_linear.json`` and ``figures/theory_linear.png``.
"""

import argparse

from ntkd.theory import run_experiment

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run_experiment("linear", args.out, quick=args.quick, seed=args.seed)
