"""Tang et al. (2020): universe, domain and instance knowledge in KD.

Command (a few minutes on 2 shared CPU cores; ``--quick``: under a minute):

    PYTHONPATH=. python experiments/theory_knowledge.py --out figures

Equivalent CLI: ``ntkd theory knowledge --out figures``. Writes
``figures/theory_knowledge.json`` and ``figures/theory_knowledge.png``.
"""

import argparse

from ntkd.theory import run_experiment

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run_experiment("knowledge", args.out, quick=args.quick, seed=args.seed)
