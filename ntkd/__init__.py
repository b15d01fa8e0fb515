"""ntkd: knowledge distillation through the student's empirical NTK.

The public facade re-exports the functions used most from a notebook.
Library modules:

- ``ntkd.data``: datasets (MNIST-1D, digits, CIFAR-10/100, Tiny-ImageNet, Gaussian).
- ``ntkd.models``: Flax Linen models used through ``apply(variables, x)``.
- ``ntkd.training``: losses, optimisers, teacher and student training.
- ``ntkd.checkpoints``: atomic Orbax checkpoints with metadata.
- ``ntkd.metrics``: accuracy, fidelity, KL, margins.
- ``ntkd.ntk``: the empirical-NTK engine (docs/ntk.md).
- ``ntkd.complexity``, ``ntkd.kernels``, ``ntkd.targets``: supervision
  complexity, the margin bound, alignment/CKA, Hutch++ (docs/complexity.md).
- ``ntkd.matfree``: matrix-free certified complexity bounds, spectra, streaming
  and projected eNTKs (docs/matfree.md).
- ``ntkd.study``, ``ntkd.configs``, ``ntkd.report``, ``ntkd.plotting``: the study.
- ``ntkd.findings``, ``ntkd.stats``: pre-registered criteria, paired tests, Holm (docs/study.md).
"""

from importlib.metadata import PackageNotFoundError, version

from ntkd import _hostmem
from ntkd._hostmem import tune as tune_host_memory

try:
    __version__ = version("ntkd")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"

if _hostmem.requested_at_import():  # opt-in; must precede JAX's first computation
    tune_host_memory()

from ntkd.complexity import (  # noqa: E402
    adjusted_supervision_complexity,
    compare_teachers,
    factor_kernel,
    format_table,
    kernel_margin_bound,
    margin_bound,
    normalized_adjusted_complexity,
    supervision_complexity,
    supervision_complexity_cg,
    write_table,
)
from ntkd.kernels import (  # noqa: E402
    alignment_spectrum,
    estimate_alignment,
    hutchinson_trace,
    hutchpp_trace,
    kernel_alignment,
)
from ntkd.matfree import (  # noqa: E402
    alignment_curve,
    ntk_matvec,
    projected_ntk,
    shift_from_ridge,
    supervision_complexity_bounds,
    top_eigenpairs,
)
from ntkd.ntk import as_apply_fn, empirical_ntk, empirical_ntk_fn, flax_apply_fn, ntk_vp_fn  # noqa: E402
from ntkd.targets import (  # noqa: E402
    label_smoothing,
    matched_label_smoothing,
    one_hot,
    random_labels,
    softmax_targets,
)

__all__ = [
    "__version__",
    "tune_host_memory",
    "adjusted_supervision_complexity",
    "alignment_curve",
    "alignment_spectrum",
    "as_apply_fn",
    "compare_teachers",
    "empirical_ntk",
    "empirical_ntk_fn",
    "estimate_alignment",
    "factor_kernel",
    "flax_apply_fn",
    "format_table",
    "hutchinson_trace",
    "hutchpp_trace",
    "kernel_alignment",
    "kernel_margin_bound",
    "label_smoothing",
    "margin_bound",
    "matched_label_smoothing",
    "normalized_adjusted_complexity",
    "ntk_matvec",
    "ntk_vp_fn",
    "one_hot",
    "projected_ntk",
    "random_labels",
    "shift_from_ridge",
    "softmax_targets",
    "supervision_complexity",
    "supervision_complexity_bounds",
    "supervision_complexity_cg",
    "top_eigenpairs",
    "write_table",
]
