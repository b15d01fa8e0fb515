"""Experiment 3 — the distillation table.

No-KD, offline τ = 1 and 4, early-stopped teacher, online τ = 1 and 4 (and a
small-gap student), 3 seeds: student test accuracy mean ± std, train and test
fidelity, test KL(teacher ‖ student); Markdown + CSV.

Command:   python experiments/distillation_table.py --dataset mnist1d --out results/mnist1d
           (runs ``ntkd step distillation`` with the same arguments; ``--set KEY=VALUE`` overrides the preset)
Runtime:   ~7 min on 2 CPU cores (training 28 runs); the table itself is instant.
Output:    results/mnist1d/results/distillation.{json,csv,md}, figures/distillation.png
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["step", "distillation", *sys.argv[1:]]))
