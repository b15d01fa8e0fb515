"""Jacobian contraction: per-example Jacobians, one matmul per block pair.

Cost for N examples, O cotangents, P parameters, [FP] one forward pass:
N·O·[FP] for the Jacobians plus N²·O²·P for the contraction (Novak et al.,
"Fast Finite Width Neural Tangent Kernel", ICML 2022, §3.2).
"""

from __future__ import annotations

import jax

from ntkd.ntk._util import flatten, inexact
from ntkd.ntk.algorithm import Problem


def per_example_grads(fn, params, state, x, basis, which=None) -> list:
    """Per-example VJPs of ``fn`` for the (m, k) ``basis``.

    Args:
        which: indices of the params leaves to differentiate (default: every
            inexact leaf); the others are held fixed.

    Returns:
        One (b, m, *leaf) array per differentiated leaf, in ``which`` order.
    """
    leaves, treedef = jax.tree.flatten(params)
    if which is None:
        which = [i for i, l in enumerate(leaves) if inexact(l)]
    which = list(which)

    def f_sub(sub, xi):
        full = list(leaves)
        for i, v in zip(which, sub):
            full[i] = v
        return fn(jax.tree.unflatten(treedef, full), state, xi[None])[0]

    def one(xi):
        _, vjp = jax.vjp(lambda s: f_sub(s, xi), [leaves[i] for i in which])
        return jax.vmap(lambda c: vjp(c)[0])(basis)

    return jax.vmap(one)(x)


def grouped(problem: Problem, grads: list, which: list) -> dict:
    """{group: (b, m, P_group)} from per-leaf gradients."""
    by: dict = {}
    for g, i in zip(grads, which):
        by.setdefault(problem.groups[i] if problem.by_layer else "", []).append(g)
    return {name: flatten(gs, 2) for name, gs in by.items()}


class Jacobian:
    """Per-example Jacobians (b, m, P) contracted by one (chunked) matmul per block pair."""

    shares_features = True

    def __init__(self, problem: Problem):
        self.p = problem

    def row(self, params, state, x):
        leaves = jax.tree.leaves(params)
        which = [i for i, l in enumerate(leaves) if inexact(l)]
        basis = self.p.mode.basis(self.p.k, self.p.dtype)
        return grouped(self.p, per_example_grads(self.p.fn, params, state, x, basis, which), which)

    col = row

    def pair(self, params, state, r, c):
        terms = self.p.terms()
        for name in r:
            terms.add(name, self.p.mode.contract(r[name], c[name], self.p.gram))
        any_r = next(iter(r.values()))
        return terms.result(
            self.p.mode.block_shape(any_r.shape[0], next(iter(c.values())).shape[0], self.p.k),
            any_r.dtype,
        )
