"""NTK-vector products: row Jacobians pushed forward through the network at the columns.

Cost N²·O·[FP] and no parameter-sized contraction; wins only when O·P ≫ [FP]
(Novak et al., ICML 2022, §3.3).
"""

from __future__ import annotations

import jax

from ntkd.ntk._util import inexact
from ntkd.ntk.algorithm import Problem
from ntkd.ntk.jacobian import per_example_grads


class NtkVectorProducts:
    """Row features: per-example gradients; column features: the inputs themselves."""

    shares_features = False

    def __init__(self, problem: Problem):
        self.p = problem

    def _which(self, params):
        return [i for i, l in enumerate(jax.tree.leaves(params)) if inexact(l)]

    def row(self, params, state, x):
        basis = self.p.mode.basis(self.p.k, self.p.dtype)
        return per_example_grads(self.p.fn, params, state, x, basis, self._which(params))

    def col(self, params, state, x):
        return x

    def pair(self, params, state, r, x2):
        leaves, treedef = jax.tree.flatten(params)
        which = self._which(params)
        b1, m = r[0].shape[:2]
        groups = [self.p.groups[i] if self.p.by_layer else "" for i in which]
        terms = self.p.terms()
        for name in dict.fromkeys(groups):
            sel = [j for j, g in enumerate(groups) if g == name]

            def f_sub(sub, sel=sel):
                full = list(leaves)
                for j, v in zip(sel, sub):
                    full[which[j]] = v
                return self.p.fn(jax.tree.unflatten(treedef, full), state, x2)

            _, push = jax.linearize(f_sub, [leaves[which[j]] for j in sel])
            flat = [r[j].reshape((b1 * m,) + r[j].shape[2:]) for j in sel]
            out = jax.lax.map(push, flat, batch_size=min(m * b1, 64))  # (b1·m, b2, k)
            out = out.reshape(b1, m, x2.shape[0], self.p.k)
            terms.add(name, self.p.mode.from_outputs(out), natural=False)
        return terms.result(self.p.mode.block_shape(b1, x2.shape[0], self.p.k), r[0].dtype)
