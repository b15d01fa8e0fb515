"""Model adapters: every supported model kind becomes one ``ApplyFn``.

An :class:`ApplyFn` is ``apply_fn(params, x) -> (batch, k)`` built from a pure
``fn(params, state, x)`` and fixed, never-differentiated ``state`` (BatchNorm
statistics, RNG state, integer buffers). Its ``key`` names the model's
structure, not its values, so compiled kernels are reused for new params and
state of the same structure.

Supported kinds (:func:`as_apply_fn`):

- Flax Linen module + its variables: ``variables["params"]`` differentiated,
  other collections fixed, ``train=False`` when ``__call__`` takes it.
- Flax NNX module (owns its parameters): ``nnx.Param`` differentiated, every
  other variable (``BatchStat``, RNG state, …) fixed, run in eval mode.
- Equinox module (owns its parameters): its inexact arrays differentiated,
  other arrays fixed, run in inference mode (``eqx.nn.inference_mode``);
  called on one example at a time and vmapped over the batch, as Equinox
  models are written. A stateful one (``eqx.nn.BatchNorm`` …) comes as the
  pair ``(model, state)`` of ``eqx.nn.make_with_state``: the ``eqx.nn.State``
  is fixed, ``model(x, state) -> (y, new_state)`` is called per example and
  ``new_state`` discarded.
- Any function ``f(params, x) -> (batch, k)``: all of ``params`` differentiated.
"""

from __future__ import annotations

import collections
import functools
import inspect
import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from ntkd.ntk._util import Hashed, remember

PyTree = Any

Model = Any
"""What the entry points accept as ``model``: a Linen module, an NNX module, an
Equinox module or an ``(eqx module, eqx.nn.State)`` pair, an :class:`ApplyFn`,
or any function ``f(params, x) -> (batch, k)`` (see :func:`as_apply_fn`)."""


class ApplyFn:
    """``apply_fn(params, x) -> (batch, k)``: a pure function with fixed state.

    Attributes:
        fn: ``fn(params, state, x)``, a function of the model's structure only.
        state: fixed arrays (not differentiated).
        key: hashable name of the structure; equal keys mean equal ``fn``.
        kind: ``"linen"``, ``"nnx"``, ``"equinox"`` or ``"function"``.
    """

    def __init__(self, fn: Callable, state: PyTree, key: Hashable, kind: str):
        self.fn, self.state, self.key, self.kind = fn, state, key, kind

    def __call__(self, params: PyTree, x: jax.Array) -> jax.Array:
        return self.fn(params, self.state, x)

    def __repr__(self):
        return f"{type(self).__name__}(kind={self.kind!r})"


def _linen_fn(module, kwargs, params, state, x):
    return module.apply({"params": params, **state}, x, **dict(kwargs))


class FlaxApplyFn(ApplyFn):
    """``apply_fn(params, x)`` of a Linen module with frozen non-param collections.

    Attributes:
        module: the ``flax.linen.Module``.
        frozen: every collection but ``"params"`` (e.g. ``batch_stats``).
        kwargs: extra call arguments (``train=False`` when ``__call__`` takes it).
    """

    def __init__(self, module: nn.Module, frozen: dict, kwargs: dict):
        self.module, self.frozen, self.kwargs = module, frozen, kwargs
        frozen_kwargs = tuple(sorted(kwargs.items()))
        super().__init__(
            functools.partial(_linen_fn, module, frozen_kwargs),
            frozen,
            ("linen", module, frozen_kwargs),
            "linen",
        )

    def variables(self, params: PyTree) -> dict:
        return {"params": params, **self.frozen}


def flax_apply_fn(model: nn.Module, variables: dict) -> tuple[FlaxApplyFn, PyTree]:
    """Splits a Linen model into a differentiable ``apply_fn`` and its params.

    Only ``variables["params"]`` is differentiated; every other collection
    (e.g. BatchNorm ``batch_stats``) is fixed and the model runs in eval mode
    (``train=False`` when its ``__call__`` takes ``train``).

    Args:
        model: a ``flax.linen.Module``.
        variables: its variables, e.g. from ``model.init``; must hold ``"params"``.

    Returns:
        ``(apply_fn, params)`` with ``apply_fn(params, x) -> (n, k)``.

    Example:
        >>> apply_fn, params = flax_apply_fn(model, variables)
        >>> k = empirical_ntk(apply_fn, params, x)
    """
    if not isinstance(variables, dict) and not hasattr(variables, "keys"):
        raise ValueError(
            f"variables must be the dict from model.init(...); got {type(variables).__name__}."
        )
    if "params" not in variables:
        raise ValueError(
            f"variables has collections {sorted(variables)} but no 'params'; pass "
            "the dict returned by model.init(...)."
        )
    frozen = {c: v for c, v in variables.items() if c != "params"}
    kwargs = {}
    if "train" in inspect.signature(model.__call__).parameters:
        kwargs["train"] = False
    return FlaxApplyFn(model, frozen, kwargs), variables["params"]


def _nnx_fn(graphdef, params, state, x):
    from flax import nnx

    model = nnx.merge(graphdef, params, state)
    model.eval()  # BatchNorm uses its running statistics, dropout is off
    return model(x)


def _equinox_fn(treedef, static, params, state, x):
    model = jax.tree.unflatten(treedef, _combine(static, jax.tree.leaves(params), state))
    return jax.vmap(model)(x)


def _equinox_stateful_fn(treedef, static, params, state, x):
    """``model(x_i, eqx_state)[0]`` per example: the ``eqx.nn.State`` is a constant."""
    arrays, eqx_state = state
    model = jax.tree.unflatten(treedef, _combine(static, jax.tree.leaves(params), arrays))
    # a copy: State.set invalidates the object it is called on, which must stay usable
    eqx_state = jax.tree.map(lambda l: l, eqx_state)

    def one(xi):
        out = model(xi, eqx_state)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"a stateful Equinox module must return (y, state) from model(x, state); "
                f"{type(model).__name__} returned {type(out).__name__}"
            )
        return out[0]  # the new state is discarded: the kernel is of the fixed-state function

    return jax.vmap(one)(x)


def _combine(static, params, state):
    p, s = iter(params), iter(state)
    return [next(p) if kind == "p" else next(s) if kind == "s" else v for kind, v in static]


_EQX_INDICES: collections.OrderedDict = collections.OrderedDict()


def _equinox_state_indices(model) -> int:
    """How many ``eqx.nn.StateIndex``es a module holds (then it is called as
    ``model(x, state)``); remembered per pytree structure, which fixes it."""
    import equinox as eqx

    treedef = jax.tree.structure(model)
    if treedef in _EQX_INDICES:
        return _EQX_INDICES[treedef]
    is_index = lambda l: isinstance(l, eqx.nn.StateIndex)
    count = sum(1 for l in jax.tree.leaves(model, is_leaf=is_index) if is_index(l))
    return remember(_EQX_INDICES, treedef, count, 256)


_EQX_PLAIN: collections.OrderedDict = collections.OrderedDict()
"""(treedef, static) of Equinox modules that inference mode and init-state deletion leave
unchanged (recently seen, at most 256): their per-call split skips both tree rewrites
(``eqx.nn.inference_mode`` alone costs ~0.2 ms for a 3-layer MLP)."""


def _equinox_classify(leaves) -> tuple:
    """Per leaf: ("p", None) for an inexact array, ("s", None) another array, else ("v", leaf)."""
    import equinox as eqx

    return tuple(
        ("p", None) if eqx.is_inexact_array(l) else ("s", None) if eqx.is_array(l) else ("v", l)
        for l in leaves
    )


def _equinox_split(model):
    """(treedef, static, params, state) of an Equinox module: inexact arrays are params.

    The module is put in inference mode (``eqx.nn.inference_mode``: BatchNorm uses
    its running statistics, dropout is off) and stripped of the initial values its
    ``StateIndex``es may still hold (never read once the state exists).
    """
    import equinox as eqx

    leaves, treedef = jax.tree.flatten(model)
    static = _equinox_classify(leaves)
    try:
        seen = (treedef, static)
        plain = seen in _EQX_PLAIN
    except TypeError:  # an unhashable static value: take the slow path, which reports it
        seen, plain = None, False
    if plain:
        _EQX_PLAIN.move_to_end(seen)
    else:
        ready = eqx.nn.inference_mode(eqx.nn.delete_init_state(model))
        ready_leaves, ready_def = jax.tree.flatten(ready)
        unchanged = ready_def == treedef and all(a is b for a, b in zip(ready_leaves, leaves))
        if unchanged and seen is not None:
            remember(_EQX_PLAIN, seen, None, 256)
        elif not unchanged:
            model, leaves, treedef = ready, ready_leaves, ready_def
            static = _equinox_classify(leaves)
    state = [l for (kind, _), l in zip(static, leaves) if kind == "s"]
    # params keep the module's shape (non-parameters None, as eqx.partition does), so their
    # paths name the layers (by_layer groups)
    params = jax.tree.unflatten(
        treedef, [l if kind == "p" else None for (kind, _), l in zip(static, leaves)]
    )
    try:
        hash(static)
    except TypeError as e:
        raise ValueError(
            f"Equinox module {type(model).__name__} has an unhashable static field ({e}); "
            "mark it eqx.field(static=True) with a hashable value."
        ) from None
    return treedef, static, params, state


def _is_nnx(model) -> bool:
    try:
        from flax import nnx
    except ImportError:
        return False
    return isinstance(model, nnx.Module)


def _is_equinox(model) -> bool:
    try:
        import equinox as eqx
    except ImportError:
        return False
    return isinstance(model, eqx.Module)


def _is_equinox_pair(model) -> bool:
    return isinstance(model, tuple) and len(model) == 2 and _is_equinox(model[0])


_EQX_LAST: dict = {}
"""{id(module): (treedef, leaves, (apply_fn, params))}: the last split of each live
stateless Equinox module (the entry leaves with its module). A module is immutable, so
a call on the same object with the same leaves gets the same split back; everything it
holds is the module's own (``eqx.nn.inference_mode`` and the split's classification,
hashing and unflattening cost ~0.1 ms a call, cold, for a 3-layer MLP)."""


def _equinox_apply_fn(model, eqx_state=None, paired=False) -> tuple[ApplyFn, PyTree]:
    if not paired:
        leaves, treedef = jax.tree.flatten(model)
        last = _EQX_LAST.get(id(model))
        if (
            last is not None
            and last[0] == treedef
            and len(last[1]) == len(leaves)
            and all(a is b for a, b in zip(last[1], leaves))
        ):
            return last[2]
        out = _equinox_split_fn(model, eqx_state, paired)
        if id(model) not in _EQX_LAST:
            try:
                weakref.finalize(model, _EQX_LAST.pop, id(model), None)
            except TypeError:  # not weakly referenceable: not remembered
                return out
        _EQX_LAST[id(model)] = (treedef, leaves, out)
        return out
    return _equinox_split_fn(model, eqx_state, paired)


def _equinox_split_fn(model, eqx_state=None, paired=False) -> tuple[ApplyFn, PyTree]:
    import equinox as eqx

    name = type(model).__name__
    indices = _equinox_state_indices(model)
    if not paired and indices:
        raise ValueError(
            f"Equinox module {name} is stateful ({indices} eqx.nn.StateIndex, e.g. "
            "BatchNorm statistics) and is called as model(x, state); pass it together with "
            "its eqx.nn.State as the model: empirical_ntk((model, state), None, x), "
            f"(model, state) as returned by eqx.nn.make_with_state({name})(...)."
        )
    if paired and not indices:
        raise ValueError(
            f"Equinox module {name} has no eqx.nn.StateIndex, so it takes no state; "
            "pass the module alone: empirical_ntk(model, None, x)."
        )
    treedef, static, params, state = _equinox_split(model)
    if not paired:
        return ApplyFn(
            functools.partial(_equinox_fn, treedef, static),
            state,
            Hashed(("equinox", treedef, static)),  # hashed once: a treedef is costly to hash
            "equinox",
        ), params
    if not isinstance(eqx_state, eqx.nn.State):
        raise ValueError(
            f"(model, state): state must be the eqx.nn.State of Equinox module {name} "
            f"(from eqx.nn.make_with_state); got {type(eqx_state).__name__}."
        )
    try:  # only this module's entries, each one present
        eqx_state = eqx_state.substate(model)
    except KeyError as e:
        raise ValueError(
            f"the eqx.nn.State has no value for StateIndex {e} of Equinox module {name}; "
            "pass the state made with this module (eqx.nn.make_with_state)."
        ) from None
    except ValueError as e:
        raise ValueError(f"cannot use this eqx.nn.State with module {name}: {e}") from None
    return ApplyFn(
        functools.partial(_equinox_stateful_fn, treedef, static),
        (state, eqx_state),
        ("equinox+state", treedef, static),
        "equinox",
    ), params


class _NNXSplit(NamedTuple):
    """How one NNX module's pytree leaves become its ``nnx.split`` params and state:
    per form (``nnx.State``s, or their ``nnx.to_pure_dict`` nested dicts) the two tree
    definitions and the leaf positions they take."""

    treedef: Any
    fn: Callable
    key: Hashable
    forms: dict


_NNX_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _nnx_apply_fn(model, pure: bool = False) -> tuple[ApplyFn, PyTree]:
    """``nnx.split(model, nnx.Param, ...)`` as an ApplyFn; repeated calls skip the split.

    ``nnx.split`` walks the module graph (~0.25 ms for a 3-layer MLP, 5 % of its
    n = 128 `trace` kernel). Its result is remembered per module object with the
    module's pytree structure; a later call whose ``jax.tree.flatten(model)`` has
    the same structure (same static attributes, variable types and metadata)
    takes the current arrays from the flat leaves (~0.03 ms). A module whose
    split leaves are not all distinct pytree leaves (shared variables) is split
    every time.

    ``pure=True`` gives params and state as nested dicts (``nnx.to_pure_dict``;
    ``nnx.merge`` takes them, and their paths name the same groups). The entry points
    use them: building and flattening dicts runs in C++, ``nnx.State``s of
    ``Variable``s call back into Python for every node (~0.1 ms a call, cold, for a
    3-layer MLP).
    """
    from flax import nnx

    try:
        leaves, treedef = jax.tree.flatten(model)
    except Exception:  # not a pytree in this Flax version: split every time
        leaves, treedef = None, None
    cached = _NNX_SPLITS.get(model) if treedef is not None else None
    if cached is not None and cached.treedef == treedef:
        params_def, p_idx, state_def, s_idx = cached.forms[pure]
        params = jax.tree.unflatten(params_def, [leaves[i] for i in p_idx])
        state = jax.tree.unflatten(state_def, [leaves[i] for i in s_idx])
        return ApplyFn(cached.fn, state, cached.key, "nnx"), params
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    fn, key = functools.partial(_nnx_fn, graphdef), ("nnx", Hashed((graphdef,)))
    forms = {False: (params, state), True: (nnx.to_pure_dict(params), nnx.to_pure_dict(state))}
    if treedef is not None:
        where = {id(l): i for i, l in enumerate(leaves)}
        found = {}
        for form, (p, st) in forms.items():
            p_leaves, params_def = jax.tree.flatten(p)
            s_leaves, state_def = jax.tree.flatten(st)
            p_idx = [where.get(id(l)) for l in p_leaves]
            s_idx = [where.get(id(l)) for l in s_leaves]
            idx = p_idx + s_idx
            if None in idx or not len(set(idx)) == len(idx) == len(leaves):
                break
            found[form] = (params_def, p_idx, state_def, s_idx)
        else:
            _NNX_SPLITS[model] = _NNXSplit(treedef, fn, key, found)
    params, state = forms[pure]
    return ApplyFn(fn, state, key, "nnx"), params


def as_apply_fn(model: Model, variables: PyTree | None = None) -> tuple[ApplyFn, PyTree]:
    """Splits any supported model into ``(apply_fn, params)``.

    Args:
        model: a Flax Linen module (pass ``variables``), a Flax NNX module or an
            Equinox module (they own their parameters: ``variables=None``), a
            stateful Equinox module with its ``eqx.nn.State`` as the pair
            ``(model, state)`` (as ``eqx.nn.make_with_state`` returns it;
            ``variables=None``), an :class:`ApplyFn`, or a function
            ``f(params, x) -> (batch, k)`` (pass its params as ``variables``).
        variables: Linen variables, or the params of a function; None for NNX
            and Equinox modules.

    Returns:
        ``(apply_fn, params)``: ``apply_fn(params, x) -> (batch, k)`` and the
        differentiated parameters (NNX: an ``nnx.State`` of the ``nnx.Param``s;
        Equinox: the module with every non-parameter leaf None, as
        ``eqx.partition(model, eqx.is_inexact_array)[0]``).

        Every model runs in eval mode with its non-parameter state held fixed:
        Linen with ``train=False`` and fixed collections (``batch_stats``), NNX
        after ``.eval()`` with fixed ``BatchStat``s, Equinox in
        ``eqx.nn.inference_mode``. A stateful Equinox module is called per
        example as ``model(x_i, state) -> (y_i, new_state)``: ``state`` is a
        constant (its running statistics are not differentiated; in inference
        mode BatchNorm reads them and needs no batch ``axis_name``) and
        ``new_state`` is discarded, so the kernel is that of the deterministic
        inference-mode function.

    Raises:
        ValueError: params given for a module that owns them, missing for one
            that does not, a stateful Equinox module without its state (or state
            with a module that has none, or another module's state), or a model
            kind that cannot be split.

    Example:
        >>> apply_fn, params = as_apply_fn(nnx_model)            # NNX / Equinox
        >>> apply_fn, params = as_apply_fn(linen_model, variables)
        >>> apply_fn, params = as_apply_fn(eqx.nn.make_with_state(Net)(key))  # (model, state)
    """
    return _split(model, variables, pure=False)


def split_for_engine(model: Model, variables: PyTree | None = None) -> tuple[ApplyFn, PyTree]:
    """:func:`as_apply_fn` as the entry points use it: an NNX module's params and state
    as nested dicts (``nnx.to_pure_dict``), which are cheaper to build and
    flatten at every call than ``nnx.State``s; every other kind as there."""
    return _split(model, variables, pure=True)


def _split(model, variables, pure: bool) -> tuple[ApplyFn, PyTree]:
    if type(model) in _PLAIN_CALLABLES:  # never a module: skip the module-kind checks
        return _function_apply_fn(model, variables)
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(
                f"Linen module {type(model).__name__} holds no parameters; pass its "
                "variables (the dict from model.init(...)) as params."
            )
        return flax_apply_fn(model, variables)
    paired = _is_equinox_pair(model)
    module = model[0] if paired else model
    owner = "NNX" if _is_nnx(module) else "Equinox" if _is_equinox(module) else None
    if owner is not None and variables is not None:
        raise ValueError(
            f"{owner} module {type(module).__name__} owns its parameters; pass params=None "
            "(the kernel is taken with respect to the module's own parameters)."
        )
    if owner == "NNX":
        return _nnx_apply_fn(model, pure)
    if owner == "Equinox":
        return _equinox_apply_fn(module, model[1] if paired else None, paired)
    if isinstance(model, ApplyFn):
        return model, variables
    if not callable(model) or inspect.isclass(model):
        raise ValueError(
            f"cannot split a {type(model).__module__}.{type(model).__name__} into parameters and an "
            "apply function; pass a Flax Linen / NNX or Equinox module, a stateful Equinox "
            "module as (model, state), or a function f(params, x) -> (batch, k) with its params."
        )
    return _function_apply_fn(model, variables)


_PLAIN_CALLABLES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _function_apply_fn(f, params) -> tuple[ApplyFn, PyTree]:
    if params is None:
        raise ValueError("a function f(params, x) needs its params; got params=None.")
    return ApplyFn(functools.partial(_call_function, f), None, ("function", f), "function"), params


def _call_function(f, params, state, x):
    return f(params, x)
