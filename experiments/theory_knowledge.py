"""Tang et al. (2020): universe, domain and instance knowledge in KD.

Command (about 70 s on 2 CPU cores, 71 s measured; ``--quick``: seconds):

    PYTHONPATH=. python experiments/theory_knowledge.py --out figures

Runs ``ntkd theory knowledge`` with the same arguments. Writes
``figures/theory_knowledge.json`` and ``figures/theory_knowledge.png``; ``ntkd figures``
redraws the PNG from the JSON alone.
"""

import sys

from ntkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["theory", "knowledge", *sys.argv[1:]]))
