"""Experiment 4 — NTK similarity.

Each trained student's NTK against its NTK at initialisation and against the
teacher's NTK on the same inputs (kernel alignment and CKA), per regime, and
the trained students' NTKs against each other.

Command:   python experiments/ntk_similarity.py --dataset mnist1d --out results/mnist1d
           (runs ``ntkd step ntk_similarity`` with the same arguments; ``--set KEY=VALUE`` overrides the preset)
Runtime:   ~30 s once the runs exist; training first ~7 min on 2 CPU cores.
Output:    results/mnist1d/results/ntk_similarity.json, figures/ntk_similarity.png
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["step", "ntk_similarity", *sys.argv[1:]]))
