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
  other arrays fixed; called on one example at a time and vmapped over the
  batch, as Equinox models are written.
- Any function ``f(params, x) -> (batch, k)``: all of ``params`` differentiated.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import flax.linen as nn
import jax

PyTree = Any


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


def _combine(static, params, state):
    p, s = iter(params), iter(state)
    return [next(p) if kind == "p" else next(s) if kind == "s" else v for kind, v in static]


def _equinox_split(model):
    """(treedef, static, params, state) of an Equinox module: inexact arrays are params."""
    import equinox as eqx

    leaves, treedef = jax.tree.flatten(model)
    static, params, state = [], [], []
    for leaf in leaves:
        if eqx.is_inexact_array(leaf):
            static.append(("p", None))
            params.append(leaf)
        elif eqx.is_array(leaf):
            static.append(("s", None))
            state.append(leaf)
        else:
            static.append(("v", leaf))
    static = tuple(static)
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


def as_apply_fn(model, variables: PyTree | None = None) -> tuple[ApplyFn, PyTree]:
    """Splits any supported model into ``(apply_fn, params)``.

    Args:
        model: a Flax Linen module (pass ``variables``), a Flax NNX module or an
            Equinox module (they own their parameters: ``variables=None``), an
            :class:`ApplyFn`, or a function ``f(params, x) -> (batch, k)`` (pass
            its params as ``variables``).
        variables: Linen variables, or the params of a function; None for NNX
            and Equinox modules.

    Returns:
        ``(apply_fn, params)``: ``apply_fn(params, x) -> (batch, k)`` and the
        differentiated parameters (NNX: an ``nnx.State`` of the ``nnx.Param``s;
        Equinox: the module with every non-parameter leaf None, as
        ``eqx.partition(model, eqx.is_inexact_array)[0]``).

    Raises:
        ValueError: params given for a module that owns them, missing for one
            that does not, or a model kind that cannot be split.

    Example:
        >>> apply_fn, params = as_apply_fn(nnx_model)            # NNX / Equinox
        >>> apply_fn, params = as_apply_fn(linen_model, variables)
    """
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(
                f"Linen module {type(model).__name__} holds no parameters; pass its "
                "variables (the dict from model.init(...)) as params."
            )
        return flax_apply_fn(model, variables)
    owner = "NNX" if _is_nnx(model) else "Equinox" if _is_equinox(model) else None
    if owner is not None and variables is not None:
        raise ValueError(
            f"{owner} module {type(model).__name__} owns its parameters; pass params=None "
            "(the kernel is taken with respect to the module's own parameters)."
        )
    if owner == "NNX":
        from flax import nnx

        graphdef, params, state = nnx.split(model, nnx.Param, ...)
        return ApplyFn(
            functools.partial(_nnx_fn, graphdef), state, ("nnx", graphdef), "nnx"
        ), params
    if owner == "Equinox":
        treedef, static, params, state = _equinox_split(model)
        return ApplyFn(
            functools.partial(_equinox_fn, treedef, static),
            state,
            ("equinox", treedef, static),
            "equinox",
        ), params
    if isinstance(model, ApplyFn):
        return model, variables
    if not callable(model) or inspect.isclass(model):
        raise ValueError(
            f"cannot split a {type(model).__module__}.{type(model).__name__} into parameters and an "
            "apply function; pass a Flax Linen / NNX or Equinox module, or a function "
            "f(params, x) -> (batch, k) with its params."
        )
    if variables is None:
        raise ValueError("a function f(params, x) needs its params; got params=None.")
    return ApplyFn(
        functools.partial(_call_function, model), None, ("function", model), "function"
    ), variables


def _call_function(f, params, state, x):
    return f(params, x)
