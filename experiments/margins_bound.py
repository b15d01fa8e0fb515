"""Experiment 5 — margins and the generalisation bound.

Per regime: the distribution of student margins w.r.t. the teacher's
predictions on the training subset, and the terms of the margin bound
(teacher training error, student γ-margin error, complexity term, confidence
term) over a γ grid, with the trained student's NTK and the regime's targets.

Command:   python experiments/margins_bound.py --dataset mnist1d --out results/mnist1d
           (runs ``ntkd step margins`` with the same arguments; ``--set KEY=VALUE`` overrides the preset)
Runtime:   ~15 s once the runs exist; training first ~7 min on 2 CPU cores.
Output:    results/mnist1d/results/margins.json, figures/margins.png
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["step", "margins", *sys.argv[1:]]))
