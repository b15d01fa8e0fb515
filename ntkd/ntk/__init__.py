"""Empirical neural tangent kernels of any JAX model (docs/ntk.md).

For a network ``f(params, x) -> (n, k)`` the empirical NTK is

        Θ(x, x')[a, b] = Σ_p ∂f_a(x)/∂θ_p · ∂f_b(x')/∂θ_p

computed in four modes (:mod:`~ntkd.ntk.modes`) by three exact algorithms
(Novak, Sohl-Dickstein, Schoenholz, "Fast Finite Width Neural Tangent
Kernel", ICML 2022) behind one protocol (:mod:`~ntkd.ntk.algorithm`):

- :mod:`~ntkd.ntk.jacobian`: per-example Jacobians, one matmul per block pair;
- :mod:`~ntkd.ntk.ntvp`: row Jacobians pushed through the linearised network;
- :mod:`~ntkd.ntk.structured`: dense / convolution / embedding ops found in
  the jaxpr get factorised rules, every other parameter its exact
  per-example gradient from the same backward pass.

:mod:`~ntkd.ntk.models` turns Linen, NNX and Equinox modules and plain
functions into one ``apply_fn``; :mod:`~ntkd.ntk.blocking` is the single
blocking / sharding / multi-host driver; :mod:`~ntkd.ntk.auto` measures the
candidates; :mod:`~ntkd.ntk.engine` holds the entry points and the cache.
"""

from ntkd.ntk.engine import (
    IMPLEMENTATIONS,
    chosen_implementation,
    empirical_ntk,
    empirical_ntk_fn,
)
from ntkd.ntk.models import ApplyFn, FlaxApplyFn, as_apply_fn, flax_apply_fn
from ntkd.ntk.modes import MODES, Mode
from ntkd.ntk.options import BlockOptions, ContractionOptions
from ntkd.ntk.vp import ntk_vp_fn

__all__ = [
    "MODES",
    "IMPLEMENTATIONS",
    "Mode",
    "ApplyFn",
    "FlaxApplyFn",
    "BlockOptions",
    "ContractionOptions",
    "as_apply_fn",
    "flax_apply_fn",
    "empirical_ntk_fn",
    "empirical_ntk",
    "chosen_implementation",
    "ntk_vp_fn",
]
