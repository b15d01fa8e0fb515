"""Tang et al. (2020): universe, domain and instance knowledge in KD.

Command (about 70 s on 2 CPU cores, 71 s measured; ``--quick``: seconds):

    PYTHONPATH=. python experiments/theory_knowledge.py --out figures

Equivalent CLI: ``ntkd theory knowledge --out figures``. Writes
``figures/theory_knowledge.json`` and ``figures/theory_knowledge.png``; ``ntkd figures``
redraws the PNG from the JSON alone.
"""

from ntkd.theory.plots import experiment_main

if __name__ == "__main__":
    experiment_main("knowledge", __doc__)
