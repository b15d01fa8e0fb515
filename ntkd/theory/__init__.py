"""Wider KD theory: the mechanisms of three KD-theory papers, measured side by side.

- ``ntkd.theory.linear``: Phuong & Lampert (ICML 2019), distillation of linear
  and deep linear classifiers: GD limit, transfer risk, bound, optimisation
  bias, monotonicity.
- ``ntkd.theory.variance``: Safaryan, Peste & Alistarh (NeurIPS 2023), KD as
  partial variance reduction: control-variate gradient, V(lambda), lambda*.
- ``ntkd.theory.knowledge``: Tang et al. (2020), universe / domain / instance
  knowledge: gradient rescaling, logit-layer geometry, ablation ladder.

``run_experiment(name, out_dir)`` runs one experiment and writes
``theory_<name>.json`` and ``theory_<name>.png``; ``plot_all(results_dir,
figures_dir)`` redraws every figure from the saved JSON alone.
"""

from ntkd.theory.plots import plot_all
from ntkd.theory.run import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "plot_all", "run_experiment"]
