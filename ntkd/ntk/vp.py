"""Matrix-free kernel-vector products ``v -> K @ v``, K never formed."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ntkd.ntk._util import check_finite
from ntkd.ntk.engine import _options, output_width
from ntkd.ntk.models import Model, PyTree, as_apply_fn


def ntk_vp_fn(
    model: Model, params: PyTree = None, x: jax.Array = None, *, mode: str = "trace", logit: int = 0
) -> Callable[[jax.Array], jax.Array]:
    """Kernel-vector product ``v -> K @ v`` on the inputs ``x``.

    Computes J (Jᵀ v) with one linearisation of the network at ``x`` and its
    transpose (memory ≈ one forward pass over x plus one parameter-sized
    vector per logit).

    Args:
        model, params: as in ``empirical_ntk`` (any model kind).
        x: (n, ...) inputs.
        mode, logit: as in ``empirical_ntk_fn``.

    Returns:
        ``matvec(v)``: v (n,) for scalar modes, (n, k) for ``full``; returns K @ v
        of the same shape (for ``full``, (K v)[i, a] = Σ_{j,b} Θ[i,j,a,b] v[j,b]).

    Example:
        >>> mv = ntk_vp_fn(apply_fn, params, x, mode="trace")
        >>> kv = mv(jnp.ones(x.shape[0]))
    """
    m = _options(mode, logit, "auto", False, None, None, None, None)[0]
    apply_fn, params = as_apply_fn(model, params)
    x = jnp.asarray(x)
    k, _ = output_width(apply_fn, params, x, m)
    n = x.shape[0]
    check_finite("params", params)
    check_finite("x", x)

    @jax.jit
    def matvec(v):
        out, push = jax.linearize(lambda p: apply_fn(p, x), params)
        pull = jax.linear_transpose(push, params)
        return m.matvec(push, pull, jnp.asarray(v, out.dtype), n, k)

    def checked(v):
        shape = m.vector_shape(n, k)
        if tuple(jnp.shape(v)) != shape:
            raise ValueError(
                f"v has shape {jnp.shape(v)}; mode={mode!r} on n={n} inputs with "
                f"k={k} logits needs {shape}."
            )
        return matvec(v)

    return checked
