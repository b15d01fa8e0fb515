"""Finds the parameter-consuming dense, convolution and embedding ops in a jaxpr.

Public APIs only: ``jax.make_jaxpr`` and the ``jax.extend.core`` jaxpr types.
A parameter leaf gets a *structured rule* when its value (possibly through
views: transpose, reshape, dtype conversion, nested ``jit``) is consumed by
exactly one of

- ``dot_general`` with an activation as the other operand (dense layers,
  attention projections, ``einsum``; any contracting/batch dimensions),
- ``conv_general_dilated`` as the kernel (no feature/batch groups),
- ``gather`` as the table of a row lookup (``jnp.take(E, ids, axis=0)``,
  ``E[ids]``: embeddings).

A bias — a leaf broadcast (reshape / ``broadcast_in_dim``) over everything
but the output features of such a dense or convolution op and added to its
output (possibly transposed or reshaped), which nothing else reads — joins that op's rule as a constant-1
input column. Every other inexact leaf (normalisation scales, shared weights,
grouped convolutions, parameters inside ``scan``/``custom_jvp`` bodies) is
*left over* and gets its exact per-example gradient through the same
backward pass (``ntkd.ntk.structured.features``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from ntkd.ntk._util import inexact
from ntkd.ntk.structured import patches as pt

VIEWS = frozenset(
    {"transpose", "reshape", "convert_element_type", "copy", "copy_p", "squeeze", "expand_dims"}
)
"""Single-operand ops that only rearrange a parameter: its gradient's inner products are unchanged."""

CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
"""Call primitives whose body is walked (inlined) when a parameter flows in."""

BROADCASTS = frozenset({"broadcast_in_dim"})
"""Views allowed on the way to a bias add (not for weights: broadcasting sums gradients)."""


def bind_eqn(eqn, invals: list) -> list:
    """Evaluates one equation through a one-equation ``ClosedJaxpr`` (public API)."""
    ins = list(dict.fromkeys(v for v in eqn.invars if not isinstance(v, jcore.Literal)))
    outs = [jcore.Var(v.aval) if isinstance(v, jcore.DropVar) else v for v in eqn.outvars]
    info = jcore.DebugInfo(
        "ntkd structured", eqn.primitive.name, ("",) * len(ins), ("",) * len(outs)
    )
    sub = jcore.Jaxpr([], ins, outs, [eqn.replace(outvars=outs)], eqn.effects, info)
    env = {v: a for v, a in zip(eqn.invars, invals) if not isinstance(v, jcore.Literal)}
    return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(sub, []))(*[env[v] for v in ins])


@dataclasses.dataclass(frozen=True)
class Target:
    """One op that gets a structured rule.

    Attributes:
        index: position in ``Plan.targets``.
        kind: ``"dense"``, ``"conv"`` or ``"embed"``.
        leaf: index of its parameter leaf.
        operand: position of the parameter operand in ``eqn.invars``.
        eqn: the jaxpr equation.
        bias: index of the bias leaf added to its output, if any.
    """

    index: int
    kind: str
    leaf: int
    operand: int
    eqn: Any
    bias: int | None = None

    @property
    def activation(self) -> int:
        """Position of the operand the rule records (the activation / the indices)."""
        return 1 - self.operand


@dataclasses.dataclass
class Plan:
    """What to intercept when the per-example jaxpr is evaluated.

    Attributes:
        closed: the ``ClosedJaxpr`` of ``fn(leaves, state_leaves, x)`` on one example.
        n_leaves: number of params leaves (the first jaxpr inputs).
        targets: ops with a structured rule, in discovery order.
        by_path: call path (tuple of ``id`` of nested call eqns and the op) → target.
        inline: call paths of call eqns to walk into.
        leftover: inexact params leaves without a rule.
    """

    closed: Any
    n_leaves: int
    targets: list
    by_path: dict
    inline: set
    leftover: tuple

    def unfold(self, indices) -> Plan:
        """This plan with the biases of the given targets left over instead of folded."""
        indices = set(indices)
        if not indices:
            return self
        swap = {
            id(t): dataclasses.replace(t, bias=None) for t in self.targets if t.index in indices
        }
        targets = [swap.get(id(t), t) for t in self.targets]
        by_path = {p: swap.get(id(t), t) for p, t in self.by_path.items()}
        freed = tuple(self.targets[i].bias for i in indices)
        return Plan(
            self.closed,
            self.n_leaves,
            targets,
            by_path,
            self.inline,
            tuple(sorted(self.leftover + freed)),
        )


def _is_var(v) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _gather_is_lookup(eqn, table_shape) -> bool:
    dn = eqn.params["dimension_numbers"]
    return (
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(eqn.params["slice_sizes"]) == (1,) + tuple(table_shape[1:])
        and eqn.invars[1].aval.shape[-1:] == (1,)
        and tuple(dn.offset_dims)
        == tuple(range(eqn.outvars[0].aval.ndim - len(table_shape) + 1, eqn.outvars[0].aval.ndim))
    )


def _rule(eqn, pos: int, ins: list) -> str | None:
    """The structured rule for a parameter consumed as operand ``pos`` of ``eqn``, if any."""
    name = eqn.primitive.name
    other = ins[1 - pos] if len(ins) == 2 else "many"
    if other is not None:  # the other operand is a parameter too (or there are more)
        return None
    if name == "dot_general":
        return "dense"
    if name == "conv_general_dilated" and pos == 1:
        if eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1:
            return "conv"
    if name == "gather" and pos == 0 and _gather_is_lookup(eqn, eqn.invars[0].aval.shape):
        return "embed"
    return None


def discover(closed, n_leaves: int, leaf_avals) -> Plan:
    """Walks ``closed`` (inputs: params leaves first) and assigns a rule to each leaf."""
    uses: dict = {i: [] for i in range(n_leaves)}
    inline: set = set()

    def walk(jaxpr, in_tags, ctx):
        # tags: var -> (leaf, chain of unary view eqns from the leaf to the var)
        tags = {v: (t, ()) for v, t in zip(jaxpr.invars, in_tags) if t is not None}
        reads = collections.Counter(v for e in jaxpr.eqns for v in e.invars if _is_var(v))
        reads.update(v for v in jaxpr.outvars if _is_var(v))
        made_by = {}
        for eqn in jaxpr.eqns:
            path = ctx + (id(eqn),)
            made_by.update({o: (path, eqn) for o in eqn.outvars})
            ins = [tags.get(v) if _is_var(v) else None for v in eqn.invars]
            if all(t is None for t in ins):
                continue
            name = eqn.primitive.name
            if (name in VIEWS or name in BROADCASTS) and len(eqn.invars) == 1:
                tags[eqn.outvars[0]] = (ins[0][0], ins[0][1] + (eqn,))
                continue
            if name in CALLS and isinstance(eqn.params.get("jaxpr"), jcore.ClosedJaxpr):
                inline.add(path)
                inner = walk(eqn.params["jaxpr"].jaxpr, [t and t[0] for t in ins], path)
                tags.update({o: t for o, t in zip(eqn.outvars, inner) if t is not None})
                continue
            for pos, t in enumerate(ins):
                if t is not None:
                    other = eqn.invars[1 - pos] if len(eqn.invars) == 2 else None
                    source = (other, made_by, reads) if _is_var(other) else None
                    uses[t[0]].append((path, eqn, pos, [u and u[0] for u in ins], t[1], source))
        return [tags.get(v) if _is_var(v) else None for v in jaxpr.outvars]

    top = [i if inexact(a) else None for i, a in enumerate(leaf_avals)]
    outs = walk(closed.jaxpr, top + [None] * (len(closed.jaxpr.invars) - n_leaves), ())
    for t in outs:  # a parameter returned as an output
        if t is not None:
            uses[t[0]].append(((), None, None, None, (), None))

    targets, by_path, leftover = [], {}, []
    for leaf in range(n_leaves):
        if top[leaf] is None:
            continue
        rule = None
        if len(uses[leaf]) == 1 and uses[leaf][0][1] is not None:
            path, eqn, pos, ins, chain, _ = uses[leaf][0]
            pure_view = not any(e.primitive.name in BROADCASTS for e in chain)
            rule = _rule(eqn, pos, ins) if path not in by_path and pure_view else None
        if rule is None:
            leftover.append(leaf)
            continue
        t = Target(len(targets), rule, leaf, pos, eqn)
        targets.append(t)
        by_path[path] = t
    for leaf in list(leftover):
        t = _bias_of(leaf, uses[leaf], by_path, leaf_avals[leaf])
        if t is not None:
            targets[t.index] = by_path[next(p for p, u in by_path.items() if u is t)] = (
                dataclasses.replace(t, bias=leaf)
            )
            leftover.remove(leaf)
    return Plan(closed, n_leaves, targets, by_path, inline, tuple(leftover))


def _bias_of(leaf, leaf_uses, by_path, aval) -> Target | None:
    """The target whose output this leaf is added to as a bias, if it is one.

    The add's other operand must be the target's output, possibly through
    transposes / reshapes (Equinox: ``W @ x`` under vmap), each read only
    there; the broadcast bias must vary along the output features only, as a
    bijection: checked by pushing ``arange`` through the leaf's view chain and
    pulling it back through the output's views.
    """
    if len(leaf_uses) != 1 or leaf_uses[0][1] is None or leaf_uses[0][5] is None:
        return None
    path, eqn, pos, _, chain, (var, made_by, reads) = leaf_uses[0]
    views = []
    while (
        reads[var] == 1
        and var in made_by
        and made_by[var][0] not in by_path
        and made_by[var][1].primitive.name in ("transpose", "reshape", "squeeze", "expand_dims")
        and len(made_by[var][1].invars) == 1
    ):
        views.append(made_by[var][1])
        var = made_by[var][1].invars[0]
    t = by_path.get(made_by[var][0]) if var in made_by else None
    if (
        eqn.primitive.name != "add"
        or t is None
        or reads[var] != 1
        or t.bias is not None
        or t.kind not in ("dense", "conv")
    ):
        return None
    if t.kind == "dense" and pt.dense_dims(t.eqn, t.operand)[0]:
        return None  # weights shared over batch dims: a per-h bias would be needed
    size = int(np.prod(aval.shape))
    val = np.arange(size, dtype=np.float32).reshape(aval.shape)
    for e in chain:
        val = bind_eqn(e, [val])[0]
    try:  # lax.add also broadcasts size-1 dimensions
        val = np.broadcast_to(np.asarray(val), eqn.outvars[0].aval.shape)
    except ValueError:
        return None
    for e in views:  # back to the target's output layout
        shape = e.invars[0].aval.shape
        val = (
            np.transpose(val, np.argsort(e.params["permutation"]))
            if e.primitive.name == "transpose"
            else val.reshape(shape)
        )
    if val.shape != t.eqn.outvars[0].aval.shape:
        return None
    canon = np.asarray(
        pt.dense_cotangents(t.eqn, t.operand, val, 0)
        if t.kind == "dense"
        else pt.conv_cotangents(t.eqn, val, 0)
    )[0]  # (S, C)
    if canon.shape[1] != size or not np.all(canon == canon[:1]):
        return None
    return t if np.array_equal(np.sort(canon[0]), np.arange(size)) else None


def trace(fn, params, state, x_one) -> tuple[Plan, Any]:
    """Traces ``fn(params, state, x)`` on one example and discovers its structure.

    Args:
        x_one: a ``ShapeDtypeStruct`` (or array) of shape (1, ...).

    Returns:
        ``(plan, treedefs)`` with the params and state tree definitions.
    """
    leaves, ptree = jax.tree.flatten(params)
    sleaves, stree = jax.tree.flatten(state)

    def flat_fn(ls, ss, x):
        return fn(jax.tree.unflatten(ptree, ls), jax.tree.unflatten(stree, ss), x)

    spec = lambda l: jax.ShapeDtypeStruct(jax.numpy.shape(l), jax.numpy.result_type(l))
    closed = jax.make_jaxpr(flat_fn)([spec(l) for l in leaves], [spec(l) for l in sleaves], x_one)
    # The bias check evaluates small equations on NumPy values; under an outer jax.jit
    # (jit of an ntk_fn whose engine is new) they would otherwise become tracers.
    with jax.ensure_compile_time_eval():
        plan = discover(closed, len(leaves), [spec(l) for l in leaves])
    return plan, (ptree, stree)
