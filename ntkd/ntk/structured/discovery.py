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

Every other inexact leaf (biases, normalisation scales, shared weights,
grouped convolutions, parameters inside ``scan``/``custom_jvp`` bodies) is
*left over* and gets its exact per-example gradient through the same
backward pass (``ntkd.ntk.structured.features``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend import core as jcore

from ntkd.ntk._util import inexact

VIEWS = frozenset({"transpose", "reshape", "convert_element_type", "copy", "copy_p", "squeeze",
                   "expand_dims"})
"""Single-operand ops that only rearrange a parameter: its gradient's inner products are unchanged."""

CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
"""Call primitives whose body is walked (inlined) when a parameter flows in."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One op that gets a structured rule.

    Attributes:
        index: position in ``Plan.targets``.
        kind: ``"dense"``, ``"conv"`` or ``"embed"``.
        leaf: index of its parameter leaf.
        operand: position of the parameter operand in ``eqn.invars``.
        eqn: the jaxpr equation.
    """

    index: int
    kind: str
    leaf: int
    operand: int
    eqn: Any

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


def _is_var(v) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _gather_is_lookup(eqn, table_shape) -> bool:
    dn = eqn.params["dimension_numbers"]
    return (tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
            and not tuple(getattr(dn, "operand_batching_dims", ()))
            and tuple(eqn.params["slice_sizes"]) == (1,) + tuple(table_shape[1:])
            and eqn.invars[1].aval.shape[-1:] == (1,)
            and tuple(dn.offset_dims) == tuple(range(eqn.outvars[0].aval.ndim - len(table_shape) + 1,
                                                     eqn.outvars[0].aval.ndim)))


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
        tags = {v: t for v, t in zip(jaxpr.invars, in_tags) if t is not None}
        for eqn in jaxpr.eqns:
            ins = [tags.get(v) if _is_var(v) else None for v in eqn.invars]
            if all(t is None for t in ins):
                continue
            name, path = eqn.primitive.name, ctx + (id(eqn),)
            if name in VIEWS and len(eqn.invars) == 1:
                tags[eqn.outvars[0]] = ins[0]
                continue
            if name in CALLS and isinstance(eqn.params.get("jaxpr"), jcore.ClosedJaxpr):
                inline.add(path)
                outs = walk(eqn.params["jaxpr"].jaxpr, ins, path)
                tags.update({o: t for o, t in zip(eqn.outvars, outs) if t is not None})
                continue
            for pos, t in enumerate(ins):
                if t is not None:
                    uses[t].append((path, eqn, pos, ins))
        return [tags.get(v) if _is_var(v) else None for v in jaxpr.outvars]

    top = [i if inexact(a) else None for i, a in enumerate(leaf_avals)]
    outs = walk(closed.jaxpr, top + [None] * (len(closed.jaxpr.invars) - n_leaves), ())
    for t in outs:  # a parameter returned as an output
        if t is not None:
            uses[t].append(((), None, None, None))

    targets, by_path, leftover = [], {}, []
    for leaf in range(n_leaves):
        if top[leaf] is None:
            continue
        rule = None
        if len(uses[leaf]) == 1 and uses[leaf][0][1] is not None:
            path, eqn, pos, ins = uses[leaf][0]
            rule = _rule(eqn, pos, ins) if path not in by_path else None
        if rule is None:
            leftover.append(leaf)
            continue
        t = Target(len(targets), rule, leaf, pos, eqn)
        targets.append(t)
        by_path[path] = t
    return Plan(closed, n_leaves, targets, by_path, inline, tuple(leftover))


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
    return discover(closed, len(leaves), [spec(l) for l in leaves]), (ptree, stree)
