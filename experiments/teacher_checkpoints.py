"""Experiment 1 — teacher checkpoints in the student's NTK.

Adjusted supervision complexity of every saved teacher checkpoint's
predictions at τ ∈ {1, 2, 4, 8}, measured in the student's NTK at
initialisation, against the teacher epoch, with the teacher's accuracy.

Command:   python experiments/teacher_checkpoints.py --dataset mnist1d --out results/mnist1d
Runtime:   ~15 s once the runs exist; training all runs first takes ~7 min on 2 CPU cores
           (shared with the other experiments of the same --out).
Output:    results/mnist1d/results/teacher_checkpoints.json, figures/teacher_checkpoints.png
"""

from ntkd.study import step_main

if __name__ == "__main__":
    step_main("teacher_checkpoints", __doc__)
