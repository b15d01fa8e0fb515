"""Experiment 2 — complexity of targets along the student's training.

Adjusted supervision complexity of true labels, random labels, the offline
(final) teacher and the online teacher (checkpoint of the same epoch), at
τ = 1 and 4, each measured in the student's NTK at checkpoints along its
training — one panel per student regime (no-KD, offline, online).

Command:   python experiments/student_complexity.py --dataset mnist1d --out results/mnist1d
           (runs ``ntkd step student_complexity`` with the same arguments; ``--set KEY=VALUE`` overrides the preset)
Runtime:   ~2 min once the runs exist (39 eNTKs of n = 1000); training first ~7 min on 2 CPU cores.
Output:    results/mnist1d/results/student_complexity.json, figures/student_complexity.png
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["step", "student_complexity", *sys.argv[1:]]))
