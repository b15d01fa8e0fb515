"""Small helpers shared by the algorithms: the chunked Gram product, flattening, checks."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkd.ntk.modes import HIGHEST

PyTree = Any


def gram(a: jax.Array, b: jax.Array, opts) -> jax.Array:
    """``a @ b.T`` for (r1, K) and (r2, K), planned by ``opts`` (a ``ContractionOptions``).

    Deep Grams (K ≥ ``gram_chunk_min_depth`` · (r1 + r2)) are accumulated over
    cache-sized K chunks of ``gram_chunk_bytes``: a block pair contracts few
    rows over very many parameters (ResNet-20 ``trace``: 128 × 2.7 M), and one
    matmul of that shape streams its operands at a fraction of peak (96 → 145
    GFLOP/s at 128 rows on a 2-core CPU). For shallow ones the chunks' slicing
    costs more than it saves (2-D CNN on 2 CPU cores, n = 500, kernel medians
    chunked → one matmul: ``full``, pairs of 630 × 4640 (depth 3.7 × rows),
    1.08 → 0.99 s; but ``trace``, pairs of 125 × 46 400 (depth 186 × rows),
    0.28 → 0.32 s).

    When ``a is b`` (a diagonal block traced by ``Compiled.pair_sym``) the Gram
    is symmetric: with ``symmetric_min_rows`` ≤ r and ``symmetric_min_depth`` ≤ K
    ≤ ``symmetric_max_depth_ratio`` · r, the top-left, top-right and
    bottom-right half blocks are contracted and the fourth mirrored, 3/4 of the
    flops. Assembling the halves costs a pass over the r × r output, and halving
    the rows of a deep Gram makes each matmul skinnier (fewer output tiles for
    the cores to share), which costs more than the saved quarter: see
    ``ContractionOptions`` for the measurements behind the defaults.
    """
    r, kdim = a.shape
    if (
        a is b
        and r >= opts.symmetric_min_rows
        and opts.symmetric_min_depth <= kdim <= opts.symmetric_max_depth_ratio * r
    ):
        h = r // 2
        top, bot = a[:h], a[h:]
        tr = _gram(top, bot, opts)
        return jnp.block([[_gram(top, top, opts), tr], [tr.T, _gram(bot, bot, opts)]])
    return _gram(a, b, opts)


def _gram(a: jax.Array, b: jax.Array, opts) -> jax.Array:
    (r1, kdim), r2 = a.shape, b.shape[0]
    ch = max(512, opts.gram_chunk_bytes // ((r1 + r2) * a.dtype.itemsize))
    steps = kdim // ch
    if steps < 4 or kdim < opts.gram_chunk_min_depth * (r1 + r2):
        return jnp.matmul(a, b.T, precision=HIGHEST)

    def step(s, acc):
        x = jax.lax.dynamic_slice_in_dim(a, s * ch, ch, axis=1)
        y = jax.lax.dynamic_slice_in_dim(b, s * ch, ch, axis=1)
        return acc + jnp.matmul(x, y.T, precision=HIGHEST)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((r1, r2), jnp.result_type(a, b)))
    if steps * ch < kdim:
        acc = acc + jnp.matmul(a[:, steps * ch :], b[:, steps * ch :].T, precision=HIGHEST)
    return acc


class Hashed(tuple):
    """A tuple whose hash is computed once, for cache keys looked up on every warm call:
    structure signatures and option sets (tree definitions and dataclasses, costly to
    re-hash at each lookup) and NNX GraphDefs (``Hashed((graphdef,))``; ~50 µs a hash).
    An interned instance also compares by identity in dict lookups."""

    def __new__(cls, items):
        self = super().__new__(cls, items)
        self._hash = tuple.__hash__(self)
        return self

    def __hash__(self):
        return self._hash


def flatten(leaves, lead: int) -> jax.Array:
    """Concatenates leaves (lead axes, *leaf) into (lead axes, P)."""
    return jnp.concatenate([l.reshape(l.shape[:lead] + (-1,)) for l in leaves], axis=-1)


def remember(cache: collections.OrderedDict, key, value, size: int):
    """Stores ``value`` under ``key`` in a least-recently-used cache of ``size`` entries."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def nbytes(tree) -> int:
    return sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(tree))


def is_tracer(*trees) -> bool:
    return any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(trees))


def inexact(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def finite_of(tree: PyTree) -> jax.Array:
    """Traceable: a scalar, True only when every inexact leaf of ``tree`` is finite.

    It is the finiteness of the leaves' sum (at least float32): a NaN or inf
    entry makes the sum NaN or inf, so True is never wrong; False can also mean
    a sum of huge finite values overflowed, so callers confirm on the host
    (:func:`check_finite`). One fused reduction instead of an ``isfinite`` pass
    and a reduction per leaf: MLP 784-256-256-10 params and a 128-example
    batch, 405 → 150 µs a jitted call on its own (2 CPU cores; inside the MLP `trace`
    kernel at n = 128 the gain is within the noise of its 3–5 ms).
    """
    leaves = [l for l in jax.tree.leaves(tree) if inexact(l)]
    if not leaves:
        return jnp.bool_(True)
    acc = lambda l: jnp.sum(l, dtype=jnp.promote_types(l.dtype, jnp.float32))  # noqa: E731
    return jnp.isfinite(sum(acc(l) for l in leaves))


_all_finite = jax.jit(finite_of)


def finite_flag(tree: PyTree) -> jax.Array | None:
    """A device scalar, True only when every inexact leaf is finite (dispatched, not
    awaited; False is confirmed on the host, see :func:`finite_of`)."""
    leaves = [l for l in jax.tree.leaves(tree) if inexact(l)]
    return _all_finite(leaves) if leaves else None


def host_bool(flag: jax.Array) -> bool:
    """A device scalar's truth on the host. ``bool(np.asarray(flag))``, not ``bool(flag)``:
    after a kernel, ``Array.__bool__`` took ~170 µs to ``np.asarray``'s ~35 µs (2 CPU
    cores, a 512² matmul and its flag, calls alternating)."""
    return bool(np.asarray(flag))


def all_finite(tree: PyTree) -> bool:
    """True only when every inexact leaf is finite (one reduction on the device, one
    scalar back); False can be an overflowing sum of finite values (:func:`finite_of`)."""
    flag = finite_flag(tree)
    return flag is None or host_bool(flag)


def check_finite(name: str, tree: PyTree) -> None:
    """Raises a ValueError naming the first leaf of ``tree`` with NaN/inf values.

    One compiled reduction on the device answers the common case (all finite)
    with a single scalar transfer (a host copy of the MLP 784-256-256-10's
    params and a 128-example batch cost ~0.3 ms a call, 8 % of its `trace`
    kernel); only a failing tree is copied to the host, to name the leaf or
    to find that none is bad (a finite sum that overflowed, :func:`finite_of`).
    """
    if all_finite(tree):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            where = jax.tree_util.keystr(path) or "(array)"
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(
                f"{name}{where} has {bad} non-finite value(s) (NaN/inf); the NTK "
                "would be meaningless. Clean the inputs or restore finite params."
            )


def cast(tree: PyTree, dtype) -> PyTree:
    if dtype is None:
        return tree
    return jax.tree.map(lambda l: jnp.asarray(l, dtype) if inexact(l) else l, tree)


def key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_groups(params: PyTree) -> list[str]:
    """Per leaf, the path of its parameter group: the leaf's path minus its last key.

    Linen ``{"Dense_0": {"kernel", "bias"}}`` → ``"Dense_0"``; NNX
    ``l.kernel.value`` → ``"l"``; Equinox ``layers[0].weight`` → ``"layers/0"``.
    A leaf directly at the top of the tree is its own group.
    """
    out = []
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = [key_name(k) for k in path]
        if names and names[-1] == "value":  # NNX Variable boxes: the name is one level up
            names = names[:-1]
        out.append("/".join(names[:-1] if len(names) > 1 else names))
    return out
