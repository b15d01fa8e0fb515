"""Safaryan, Peste & Alistarh (2023): KD as partial variance reduction.

Command (about 30 s on 2 CPU cores, 29 s measured; ``--quick``: seconds):

    PYTHONPATH=. python experiments/theory_variance.py --out figures

Equivalent CLI: ``ntkd theory variance --out figures``. Writes
``figures/theory_variance.json`` and ``figures/theory_variance.png``; ``ntkd figures``
redraws the PNG from the JSON alone.
"""

from ntkd.theory.plots import experiment_main

if __name__ == "__main__":
    experiment_main("variance", __doc__)
