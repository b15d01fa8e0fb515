"""Experiment 4 — NTK similarity.

Each trained student's NTK against its NTK at initialisation and against the
teacher's NTK on the same inputs (kernel alignment and CKA), per regime, and
the trained students' NTKs against each other.

Command:   python experiments/ntk_similarity.py --dataset mnist1d --out results/mnist1d
Runtime:   ~30 s once the runs exist; training first ~7 min on 2 CPU cores.
Output:    results/mnist1d/results/ntk_similarity.json, figures/ntk_similarity.png
"""

from ntkd.study import step_main

if __name__ == "__main__":
    step_main("ntk_similarity", __doc__)
