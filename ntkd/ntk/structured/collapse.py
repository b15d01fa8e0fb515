"""Collapse of output cotangents for layers that feed a linear head.

:func:`collapsible` (``trace`` mode, single-position layers) is described first;
:func:`separable` (every mode) finds convolutions whose output reaches a head
through elementwise ops and sums over its positions (global average pooling), whose
cotangents are then D_i[s, c] · V[c, a] (``ContractionOptions.separable_pool``).

In ``trace`` mode a single-position layer contributes
``(x_i·x_j) Σ_a (g_ia·g_ja)`` to the kernel, with one output cotangent g_ia
per logit a. For two kinds of layer the k cotangents are one vector times a
per-example diagonal, so the sum over a collapses into a single cotangent and
the layer's pair costs k times less:

- **head** — the layer's output reaches the logits only through ops with an
  example-independent linear Jacobian (bias adds, reshapes, scaling by a
  constant): g_ia = U_a for every example, and Σ_a g_ia·g_ja = Σ_a ‖U_a‖²
  elementwise, so g̃_i = (Σ_a g_ia²)^½ serves every pair;
- **before a head** — the layer's output passes through elementwise ops only
  (bias add, ReLU, tanh, GELU, gating by other activations, …) into the
  activation of one dense op whose output is a head in the sense above:
  g_ia = d_i ⊙ U_a with d_i the elementwise derivative and U_a the
  (example-independent) cotangent of that dense op's input, so
  Σ_a g_ia·g_ja = Σ (d_i ⊙ d_j ⊙ Σ_a U_a²) and
  g̃_i = Σ_a U_a ⊙ g_ia / ‖U‖ (0 where ‖U‖ = 0).

For an MLP f = W₃ σ(W₂ σ(W₁ x)) both W₃ and W₂ collapse (W₁'s cotangents pass
through W₂ and stay k-fold). The structure is read from the jaxpr, so the
rule is exact; anything it does not recognise keeps its k cotangents.
Custom-derivative calls (``jax.nn.relu`` is one) count as elementwise when
their body is: a custom derivative of an elementwise function is assumed to be
elementwise too.
"""

from __future__ import annotations

import collections

import numpy as np
from jax.extend import core as jcore

from ntkd.ntk.structured.discovery import Plan

ELEMENTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p",
        "expm1", "tanh", "logistic", "sin", "cos", "sqrt", "rsqrt", "cbrt", "integer_pow",
        "pow", "abs", "sign", "erf", "erfc", "erf_inv", "select_n", "convert_element_type",
        "copy", "copy_p", "square", "nextafter", "clamp", "atan", "asinh", "acosh", "atanh",
        "sinh", "cosh", "tan", "reduce_precision", "gt", "ge", "lt", "le", "eq", "ne",
        "and", "or", "not", "is_finite",
    }
)  # fmt: skip
"""Primitives whose Jacobian is diagonal when every varying operand has the output's shape
(comparisons have boolean outputs: a zero derivative; ``select_n`` picks elementwise)."""

LINEAR = frozenset(
    {
        "add", "sub", "neg", "convert_element_type", "copy", "copy_p", "reshape", "squeeze",
        "expand_dims", "transpose", "broadcast_in_dim", "reduce_sum",
    }
)  # fmt: skip
"""Primitives linear in their varying operands (add/sub: any other operand)."""

SCALINGS = frozenset({"mul", "div", "dot_general"})
"""Linear when every other operand is example-independent (div: only as the numerator)."""

VIEWS = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "copy", "copy_p"})
"""Single-operand ops that only move elements (a reshape keeps the flat order)."""


CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _is_var(v) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _body(eqn):
    for key in ("call_jaxpr", "jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr
        if isinstance(j, jcore.Jaxpr):
            return j
    return None


def _elementwise_body(jaxpr, varying: list) -> bool:
    """Every op reading a varying value inside the body is elementwise (recursively)."""
    tainted = {v for v, t in zip(jaxpr.invars, varying) if t}
    for eqn in jaxpr.eqns:
        ins = [_is_var(v) and v in tainted for v in eqn.invars]
        if not any(ins):
            continue
        if not _diagonal_eqn(eqn, ins):
            return False
        tainted.update(eqn.outvars)
    return True


def _diagonal_eqn(eqn, varying: list) -> bool:
    """Whether ``eqn``'s outputs depend on its varying inputs through a diagonal Jacobian."""
    shapes = {tuple(o.aval.shape) for o in eqn.outvars}
    if len(shapes) != 1:
        return False
    shape = shapes.pop()
    if any(t and tuple(v.aval.shape) != shape for v, t in zip(eqn.invars, varying)):
        return False
    name = eqn.primitive.name
    if name in ELEMENTWISE:
        return True
    body = _body(eqn)
    if (name in CUSTOM or name in ("jit", "pjit", "closed_call")) and body is not None:
        if len(body.invars) != len(eqn.invars):
            return False
        return _elementwise_body(body, varying)
    return False


class _Graph:
    """Readers of every top-level variable and which variables depend on the input x."""

    def __init__(self, plan: Plan):
        jaxpr = plan.closed.jaxpr
        self.jaxpr = jaxpr
        self.readers = collections.defaultdict(list)
        for e, eqn in enumerate(jaxpr.eqns):
            for pos, v in enumerate(eqn.invars):
                if _is_var(v):
                    self.readers[v].append((e, pos))
        self.outputs = [v for v in jaxpr.outvars if _is_var(v)]
        n_state = len(jaxpr.invars) - plan.n_leaves - 1
        x_vars = set(jaxpr.invars[plan.n_leaves + n_state :])
        self.per_example = set(x_vars)
        for eqn in jaxpr.eqns:
            if any(_is_var(v) and v in self.per_example for v in eqn.invars):
                self.per_example.update(eqn.outvars)
        self.targets = {
            id(t.eqn): t for path, t in plan.by_path.items() if len(path) == 1
        }  # top level only

    def linear_to_output(self, start) -> bool:
        """``start`` reaches the (single) output through example-independent linear ops only."""
        if len(self.outputs) != 1:
            return False
        tainted, todo = {start}, [start]
        while todo:
            v = todo.pop()
            for e, pos in self.readers[v]:
                eqn = self.jaxpr.eqns[e]
                name = eqn.primitive.name
                others = [u for i, u in enumerate(eqn.invars) if i != pos]
                if name in LINEAR:
                    if name not in ("add", "sub") and others:
                        return False
                elif name in SCALINGS:
                    if any(_is_var(u) and (u in tainted or u in self.per_example) for u in others):
                        return False
                    if name == "div" and pos != 0:
                        return False
                else:
                    return False
                for o in eqn.outvars:
                    if o not in tainted:
                        tainted.add(o)
                        todo.append(o)
        return self.outputs[0] in tainted

    def head_after_elementwise(self, start):
        """``(head, index map)`` when ``start`` reaches one dense target's activation through
        elementwise ops and views only, else None.

        The index map has the activation's shape and holds, per element, the flat index of
        the element of ``start`` it comes from (views such as Equinox's vmapped ``W @ x``
        transposes move elements; elementwise ops keep them).
        """
        shape = tuple(start.aval.shape)
        return self._head_through(start, np.arange(int(np.prod(shape))).reshape(shape), False)

    def head_after_pool(self, start, channel_axis: int):
        """``(head, channel map)`` when ``start`` reaches one dense target's activation
        through elementwise ops, views and sums over its positions only, else None.

        The channel map has the activation's shape and holds, per element, the channel
        (index along ``channel_axis`` of ``start``) of every element of ``start`` it
        sums; an element mixing two channels ends the search.
        """
        shape = tuple(start.aval.shape)
        channels = np.arange(shape[channel_axis]).reshape(
            [-1 if a == channel_axis else 1 for a in range(len(shape))]
        )
        return self._head_through(start, np.broadcast_to(channels, shape), True)

    def _head_through(self, start, labels: np.ndarray, sums: bool):
        """``(head, labels at its activation)`` following ``labels`` (``start``'s shape)
        through elementwise ops and views — and, with ``sums``, sums whose summed
        elements share one label — to one dense target's activation, else None."""
        maps = {start: labels}
        head = None
        for eqn in self.jaxpr.eqns:
            ins = [maps.get(v) if _is_var(v) else None for v in eqn.invars]
            if all(m is None for m in ins):
                continue
            t = self.targets.get(id(eqn))
            if t is not None and t.kind == "dense":
                if head is not None or any(
                    m is not None for i, m in enumerate(ins) if i != t.activation
                ):
                    return None  # two heads, or the layer's output used as a weight
                head = (t, ins[t.activation])
                continue
            name = eqn.primitive.name
            if sums and name == "reduce_sum" and len(eqn.invars) == 1:
                m, axes = ins[0], tuple(eqn.params["axes"])
                if not np.all(m == np.min(m, axis=axes, keepdims=True)):
                    return None  # sums across labels (channels)
                out = np.min(m, axis=axes)
            elif name in VIEWS and len(eqn.invars) == 1:
                m = ins[0]
                out = (
                    np.transpose(m, eqn.params["permutation"])
                    if name == "transpose"
                    else m.reshape(eqn.outvars[0].aval.shape)
                )
            else:
                if not _diagonal_eqn(eqn, [m is not None for m in ins]):
                    return None
                known = [m for m in ins if m is not None]
                if any(not np.array_equal(m, known[0]) for m in known[1:]):
                    return None  # elementwise across differently arranged copies
                out = known[0]
            for o in eqn.outvars:
                maps[o] = out
        if head is None or any(v in maps for v in self.outputs):
            return None
        return head


def collapsible(plan: Plan, candidates) -> dict:
    """``{target index: None (a head) or (head index, order)}`` for the collapsible targets.

    ``order`` (None: the same layout) takes the head's input cotangent, flattened, to
    the layer's output layout: ``u_layer = u_head.reshape(-1)[order]``.

    Args:
        candidates: target indices that may collapse (single-position factorised layers).
    """
    graph = _Graph(plan)
    out = {}
    for t in plan.targets:
        if t.index not in candidates or id(t.eqn) not in graph.targets:
            continue
        z = t.eqn.outvars[0]
        if graph.linear_to_output(z):
            out[t.index] = None
            continue
        found = graph.head_after_elementwise(z)
        if found is not None and graph.linear_to_output(found[0].eqn.outvars[0]):
            head, index = found
            flat = index.reshape(-1)
            if flat.size != int(np.prod(z.aval.shape)) or not np.array_equal(
                np.sort(flat), np.arange(flat.size)
            ):
                continue  # not a rearrangement of the layer's output
            identity = np.array_equal(flat, np.arange(flat.size))
            out[t.index] = (head.index, None if identity else np.argsort(flat))
    return out


def separable(plan: Plan, candidates) -> dict:
    """``{target index: (head index, channel of each head input)}`` for the convolutions
    whose output cotangents are a per-example array times the head's input cotangent.

    Such a layer reaches a linear head through elementwise ops and sums over its
    positions only (global average pooling; BatchNorm with fixed statistics, a
    residual add and a ReLU on the way are elementwise). Its cotangent for output
    cotangent μ is then g_iμ[s, c] = D_i[s, c] · V[c, μ], with V[c, μ] the head's input
    cotangent at the input that sums channel c, the same for every example. Each head
    input must sum exactly one channel, each channel reach exactly one head input.

    Args:
        candidates: indices of convolution targets (given weight gradients).
    """
    graph = _Graph(plan)
    out = {}
    for t in plan.targets:
        if t.index not in candidates or t.kind != "conv" or id(t.eqn) not in graph.targets:
            continue
        z = t.eqn.outvars[0]
        axis = t.eqn.params["dimension_numbers"][2][1]
        found = graph.head_after_pool(z, axis)
        if found is None or not graph.linear_to_output(found[0].eqn.outvars[0]):
            continue
        head, chan = found
        flat = chan.reshape(-1)
        if not np.array_equal(np.sort(flat), np.arange(z.aval.shape[axis])):
            continue
        out[t.index] = (head.index, flat)
    return out
