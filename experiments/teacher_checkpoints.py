"""Experiment 1 — teacher checkpoints in the student's NTK.

Adjusted supervision complexity of every saved teacher checkpoint's
predictions at τ ∈ {1, 2, 4, 8}, measured in the student's NTK at
initialisation, against the teacher epoch, with the teacher's accuracy.

Command:   python experiments/teacher_checkpoints.py --dataset mnist1d --out results/mnist1d
           (runs ``ntkd step teacher_checkpoints`` with the same arguments; ``--set KEY=VALUE`` overrides the preset)
Runtime:   ~15 s once the runs exist; training all runs first takes ~7 min on 2 CPU cores
           (shared with the other experiments of the same --out).
Output:    results/mnist1d/results/teacher_checkpoints.json, figures/teacher_checkpoints.png
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["step", "teacher_checkpoints", *sys.argv[1:]]))
