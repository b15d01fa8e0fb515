"""Safaryan, Peste & Alistarh (2023): KD as partial variance reduction.

Command (about 30 s on 2 CPU cores, 29 s measured; ``--quick``: seconds):

    PYTHONPATH=. python experiments/theory_variance.py --out figures

Runs ``ntkd theory variance`` with the same arguments. Writes
``figures/theory_variance.json`` and ``figures/theory_variance.png``; ``ntkd figures``
redraws the PNG from the JSON alone.
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["theory", "variance", *sys.argv[1:]]))
