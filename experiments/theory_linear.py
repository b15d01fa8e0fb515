"""Phuong & Lampert (2019): distillation of linear and deep linear students.

Command (about 2 minutes on 2 CPU cores, 114 s measured; ``--quick``: seconds):

    PYTHONPATH=. python experiments/theory_linear.py --out figures

Equivalent CLI: ``ntkd theory linear --out figures``. Writes
``figures/theory_linear.json`` and ``figures/theory_linear.png``; ``ntkd figures``
redraws the PNG from the JSON alone.
"""

from ntkd.theory.plots import experiment_main

if __name__ == "__main__":
    experiment_main("linear", __doc__)
