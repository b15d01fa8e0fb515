"""Structured (layer-wise) algorithm for any ``fn(params, state, x)``.

``discovery`` finds the parameter-consuming dense, convolution and
embedding ops in the per-example jaxpr; ``features`` re-evaluates that jaxpr
with zero perturbations on their outputs and per-example copies of every
other parameter, so one backward pass per output cotangent yields each op's
output cotangents g and the other parameters' exact per-example gradients;
``patches`` rearranges each op's recorded input; ``collapse`` sums, in
``trace`` mode, the k cotangents of a dense head and of the layer before it
into one; ``contraction`` forms
``(patch1·patch2ᵀ) ⊙ (g1·g2ᵀ)`` so the op's weights are never contracted one
by one (or, where the cost model prefers, per-example weight gradients
``Σ_s patch_sᵀ g_s`` contracted like Jacobians).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ntkd.ntk._util import flatten
from ntkd.ntk.algorithm import Problem
from ntkd.ntk.modes import HIGHEST
from ntkd.ntk.structured import collapse
from ntkd.ntk.structured import features as ft
from ntkd.ntk.structured.contraction import factor_block, wants_factor
from ntkd.ntk.structured.discovery import Plan, trace

__all__ = ["Structured", "trace"]


class Structured:
    """Layer-wise kernel from recorded layer inputs and output cotangents."""

    shares_features = True

    def __init__(self, problem: Problem, plan: Plan, leaf_sizes: list):
        if problem.by_layer:  # a bias folded into a layer of another group: keep it apart
            plan = plan.unfold(
                [
                    t.index
                    for t in plan.targets
                    if t.bias is not None and problem.groups[t.bias] != problem.groups[t.leaf]
                ]
            )
        self.p, self.plan = problem, plan
        opts, m = problem.options, problem.m
        self.fact, self.grad = [], []
        for t in plan.targets:
            h, s, d, c = ft.sizes(t)
            (
                self.fact
                if wants_factor(problem.mode, t.kind, h, s, d, c, m, opts.max_fact_positions)
                else self.grad
            ).append(t)
        # trace mode: {target: None (a head) or (the head whose input cotangent U it needs,
        # the order taking U to the target's output layout)}
        self.collapse = {}
        if problem.mode.name == "trace" and opts.collapse_trace:
            single = {t.index for t in self.fact if ft.sizes(t)[:2] == (1, 1)}
            self.collapse = collapse.collapsible(plan, single)
        # {conv target: (head, channel of each head input)} whose cotangents are D_i ⊙ V
        # (a linear head after pooling): one weight gradient per example, not m.
        self.separable = {}
        if opts.separable_pool:
            convs = {t.index for t in self.grad if t.kind == "conv"}
            self.separable = collapse.separable(plan, convs)
        self.pinned = sorted(
            {v[0] for v in self.collapse.values() if v is not None}
            | {v[0] for v in self.separable.values()}
        )
        # Positions > 1 in a factorised term build block² × S² temporaries: the driver then
        # prefers more, smaller blocks.
        self.spatial = any(ft.sizes(t)[:2] != (1, 1) for t in self.fact)
        self.convnet = any(t.kind == "conv" for t in plan.targets)
        # Flat features (b, m, P) per group: long ones alone (concatenating copied every block's
        # features once more: ResNet-20, n = 256, `trace` 12.6 → 9.9 s), short ones joined.
        self.pooled = [t for t in self.grad if t.index in self.separable]
        sources = [
            (problem.groups[t.leaf], ("target", t), m * _grad_size(t))
            for t in self.grad
            if t.index not in self.separable
        ]
        sources += [(problem.groups[i], ("leaf", i), m * leaf_sizes[i]) for i in plan.leftover]
        layout: dict = {}
        for group, src, size in sources:
            key = group if problem.by_layer else ""
            if size >= opts.separate_grad_size:
                layout[(key, len(layout))] = [src]
            else:
                layout.setdefault((key, "small"), []).append(src)
        self.layout = [(key[0], srcs) for key, srcs in layout.items()]

    @classmethod
    def build(cls, problem: Problem, params, state, x_one) -> Structured:
        plan, _ = trace(problem.fn, params, state, x_one)
        sizes = [int(jnp.size(l)) for l in jax.tree.leaves(params)]
        return cls(problem, plan, sizes)

    def row(self, params, state, x):
        left_g, g_of, pin_of, rec = self._vjps(params, state, x)
        b, m, left, dtype = x.shape[0], self.p.m, self.plan.leftover, self.p.dtype

        def collapsed(t):  # (b, H, m, S, C) cotangents, or (b, 1, 1, 1, C) where they collapse
            g = g_of(t, 2)
            if t.index not in self.collapse:
                return g
            head = self.collapse[t.index]
            if head is None:  # g_ia = U_a for every example: (Σ_a g_ia²)^½
                return _norm(g)
            u = g_of(t, 2, head)[:1]  # U_a, laid out like g (the same for every example)
            norm = _norm(u)
            return jnp.where(norm > 0, _dot_cotangents(u, g) / _nonzero(norm), 0)

        fact = [(ft.inputs(t, rec[t.index], dtype), collapsed(t)) for t in self.fact]
        flat_of = {("leaf", i): g.reshape(b, m, -1) for i, g in zip(left, left_g)}
        for t in self.grad:
            x_t = ft.inputs(t, rec[t.index], dtype)
            flat_of[("target", t)] = ft.weight_grads(
                t, x_t, g_of(t, 3), ft.sizes(t)[2], self.p.options.wide_grad_ratio
            )
        flat = [flatten([flat_of[s] for s in srcs], 2) for _, srcs in self.layout]
        pooled = [self._pooled(t, g_of(t, 3), pin_of, rec) for t in self.pooled]
        return {"fact": fact, "flat": flat, "pooled": pooled}

    def _pooled(self, t, g, pin_of, rec):
        """(H_i (b, C, D), V (b, C, m)) of a separable target: g_iμ[s, c] = D_i[s, c] · V[c, μ],
        H_i = Σ_s patch_s ⊗ D_i[s] its weight gradient under D_i alone. V is the same for
        every example; it is kept per example so that features shard over examples."""
        head, chan = self.separable[t.index]
        b, h, s, m, c = g.shape
        u = pin_of(head)  # (b, m, *head input): the same for every example
        v = u[0].reshape(m, -1)[:, np.argsort(chan)].T  # (C, m), channel c's head input
        vv = jnp.sum(v * v, axis=1)
        d = jnp.einsum("ihsmc,cm->ihsc", g, v, precision=HIGHEST)
        d = jnp.where(vv > 0, d / jnp.where(vv > 0, vv, 1), 0)[:, :, :, None, :]
        x_t = ft.inputs(t, rec[t.index], self.p.dtype)
        w = ft.weight_grads(t, x_t, d, ft.sizes(t)[2], self.p.options.wide_grad_ratio)
        return w.reshape(b, c, -1), jnp.broadcast_to(v, (b,) + v.shape)

    def _vjps(self, params, state, x):
        """One backward pass per cotangent: the leftover leaves' gradients (b, m, ...), a
        function (target, axis, head=None) -> its output cotangents (b, H, S, C) with the m
        cotangents inserted at axis (or the pinned head's input cotangents in its layout),
        and the targets' recorded inputs."""
        plan, m = self.plan, self.p.m
        leaves, sleaves = jax.tree.leaves(params), jax.tree.leaves(state)
        left = plan.leftover
        basis = self.p.mode.basis(self.p.k, self.p.dtype)

        def model(lv, pv, qv, xi):  # one example's outputs and recorded target inputs
            vals = list(leaves)
            for i, v in zip(left, lv):
                vals[i] = v
            outs, rec = ft.evaluate(plan, vals + sleaves + [xi[None]], pv, qv)
            return outs[0][0], rec

        def zeros(lead=()):  # perturbations of the targets' outputs and the pinned inputs
            perts = [_zeros(t.eqn.outvars[0].aval, lead) for t in plan.targets]
            pins = {
                h: _zeros(plan.targets[h].eqn.invars[plan.targets[h].activation].aval, lead)
                for h in self.pinned
            }
            return perts, pins

        if self.convnet and m <= self.p.options.cotangent_loop_max:
            # One VJP per cotangent, each over the batch, rather than a vmap over them:
            # batching the VJP broadcasts the residuals of some layers m times (max-pooling's
            # select-and-scatter ran 15× slower batched; LeNet-5 rows 1.41 → 1.04
            # ms/example on 2 CPU cores), and a VJP per example under vmap ran LeNet-5 and
            # ResNet-20 kernels 7-9% slower.
            b = x.shape[0]
            left_b = [jnp.broadcast_to(leaves[i], (b,) + jnp.shape(leaves[i])) for i in left]
            _, vjp, rec = jax.vjp(
                lambda lv, pv, qv: jax.vmap(model)(lv, pv, qv, x),
                left_b,
                *zeros((b,)),
                has_aux=True,
            )
            per = [vjp(jnp.broadcast_to(basis[a], (b, self.p.k))) for a in range(m)]
            left_g = [jnp.stack([q[0][j] for q in per], 1) for j in range(len(left))]

            def g_of(t, axis, head=None):  # stacked where they go (no transposed copy)
                raw = [
                    q[1][t.index] if head is None else _laid_out(t, q[2][head[0]], head[1], 1)
                    for q in per
                ]
                return jnp.stack([ft.cotangents(t, g, 1) for g in raw], axis)

            def pin_of(h):  # a pinned head's input cotangents (b, m, *input shape)
                return jnp.stack([q[2][h] for q in per], 1)

            return left_g, g_of, pin_of, rec

        # Dense networks: a VJP per example under vmap, its m cotangents vmapped (one matmul
        # of m·b rows beats m of b rows). The cotangents are not batched over examples, so
        # the ops they meet before the first example-dependent one (a dense head) run once,
        # not per example (MLP `trace`, n = 128: 0.92–0.94× the time, two A/B runs).
        def per_example(xi):
            _, vjp, rec = jax.vjp(
                lambda lv, pv, qv: model(lv, pv, qv, xi),
                [leaves[i] for i in left],
                *zeros(),
                has_aux=True,
            )
            return jax.vmap(vjp)(basis), rec

        (left_g, pg, qg), rec = jax.vmap(per_example)(x)  # (b, m, ...) each

        def g_of(t, axis, head=None):
            g = pg[t.index] if head is None else _laid_out(t, qg[head[0]], head[1], 2)
            return jnp.moveaxis(ft.cotangents(t, g, 2), 1, axis)

        def pin_of(h):
            return qg[h]

        return left_g, g_of, pin_of, rec

    col = row

    def pair(self, params, state, r, c):
        mode, terms = self.p.mode, self.p.terms()
        for t, (x1, g1), (x2, g2) in zip(self.fact, r["fact"], c["fact"]):
            terms.add(
                self.p.groups[t.leaf], factor_block(mode, t.kind, x1, g1, x2, g2, self.p.gram)
            )
        for (group, _), f1, f2 in zip(self.layout, r["flat"], c["flat"]):
            terms.add(group, mode.contract(f1, f2, self.p.gram))
        for t, (h1, v), (h2, _) in zip(self.pooled, r["pooled"], c["pooled"]):
            terms.add(self.p.groups[t.leaf], _pooled_block(mode, h1, h2, v[0]))
        b1, b2 = _rows(r), _rows(c)
        return terms.result(mode.block_shape(b1, b2, self.p.k), _dtype(r))


def _pooled_block(mode, h1, h2, v):
    """Σ_c V[c, a] V[c, b] ⟨H1_i[c], H2_j[c]⟩; ``full`` in the (i, a, j, b) layout, scalar
    modes Σ_a (a with a)."""
    s = jnp.einsum("icd,jcd->cij", h1, h2, precision=HIGHEST)  # per-channel Grams
    c, b1, b2 = s.shape
    m = v.shape[1]
    if not mode.full:
        return jnp.einsum("cij,c->ij", s, jnp.sum(v * v, axis=1), precision=HIGHEST)
    vv = (v[:, :, None] * v[:, None, :]).reshape(c, m * m)
    out = jnp.dot(s.reshape(c, b1 * b2).T, vv, precision=HIGHEST)
    return jnp.transpose(out.reshape(b1, b2, m, m), (0, 2, 1, 3))


def _zeros(aval, lead=()):
    return jnp.zeros(lead + aval.shape, aval.dtype)


def _laid_out(t, u, order, lead: int):
    """A head's input cotangents u (lead..., *input shape) in target t's output layout."""
    shape = t.eqn.outvars[0].aval.shape
    if order is None:
        return u.reshape(u.shape[:lead] + tuple(shape))
    flat = u.reshape(u.shape[:lead] + (-1,))[..., order]
    return flat.reshape(u.shape[:lead] + tuple(shape))


def _nonzero(a):
    return jnp.where(a > 0, a, 1)


def _dot_cotangents(u, g):
    """Σ_a u_a ⊙ g_a over axis 2, as m elementwise terms (XLA CPU ran the reduction as a
    slow custom fusion: MLP trace n = 128, 1.7 → 6 ms per block)."""
    out = u[:, :, :1] * g[:, :, :1]
    for a in range(1, g.shape[2]):
        out = out + u[:, :, a : a + 1] * g[:, :, a : a + 1]
    return out


def _norm(a):
    """(Σ_a a²)^½ over the cotangent axis (2), with finite derivatives at 0."""
    s = jnp.sum(a * a, axis=2, keepdims=True)
    return jnp.where(s > 0, jnp.sqrt(_nonzero(s)), 0)


def _grad_size(t) -> int:
    h, _, d, c = ft.sizes(t)
    return h * d * c


def _rows(feats) -> int:
    return jax.tree.leaves(feats)[0].shape[0]


def _dtype(feats):
    return next(l.dtype for l in jax.tree.leaves(feats) if jnp.issubdtype(l.dtype, jnp.inexact))
