"""Phuong & Lampert (2019): distillation of linear and deep linear students.

Command (about 2 minutes on 2 CPU cores, 114 s measured; ``--quick``: seconds):

    PYTHONPATH=. python experiments/theory_linear.py --out figures

Runs ``ntkd theory linear`` with the same arguments. Writes
``figures/theory_linear.json`` and ``figures/theory_linear.png``; ``ntkd figures``
redraws the PNG from the JSON alone.
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["theory", "linear", *sys.argv[1:]]))
