"""ntkd: knowledge distillation through the student's empirical NTK.

The public facade. Library modules:

- ``ntkd.data``: datasets (MNIST-1D, digits, CIFAR-10/100, Tiny-ImageNet, Gaussian).
- ``ntkd.models``: Flax Linen models used through ``apply(variables, x)``.
- ``ntkd.training``: losses, optimisers, teacher and student training.
- ``ntkd.checkpoints``: atomic Orbax checkpoints with metadata.
- ``ntkd.metrics``: accuracy, fidelity, KL, margins.
"""

__version__ = "0.1.0"

from ntkd.ntk import empirical_ntk, empirical_ntk_fn, flax_apply_fn, ntk_vp_fn  # noqa: E402
