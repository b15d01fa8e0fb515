"""Streaming eNTK–matrix products ``K @ V`` for any ``apply_fn(params, x)``.

For a network f(θ, x) ∈ R^k with Jacobian J (rows = (example, logit)), every
kernel mode is J_m J_mᵀ for a mode-specific J_m, so one product costs two
passes over the data, in blocks of examples:

1. ``G = Σ_blocks J_bᵀ C_b(V)`` — a VJP per block, vmapped over the
   cotangents C_b built from V (trace: one per (logit, column) pair, k·m of
   them; sum / logit: m; full: m), accumulated on the devices;
2. ``(K V)_b = R(J_b G)`` — a JVP per block, vmapped over the tangents G, then
   reduced R to the mode (trace: Σ_a of logit a's output for pair (a, ·)).

Memory is one block's activations times the vmapped batch, plus G (c × P).
Blocks of ``block_size · D`` examples are sharded over all D devices
(``NamedSharding``; the pass-1 sum becomes an all-reduce). Under
``jax.distributed`` (several processes, each calling the matvec with the same
host V) the devices of every process take part; each process gets the whole
product back.

Two caches (one process only) turn both passes into matmuls over data kept
on the devices, with no forward or backward pass per product:

- ``"jacobian"``: the per-example Jacobians, (padded n) · r · P floats
  (r = k in trace / full, 1 in sum / logit; P parameters);
- ``"features"``: the structured algorithm's per-example features
  (:mod:`ntkd.ntk.structured`): for every dense / convolution / embedding op
  its inputs (patches, or token ids) and output cotangents, and for every
  other parameter its flat per-example gradient. Memory: the features' bytes
  per example (from ``jax.eval_shape`` of one block) × padded n; for an MLP
  about Σ_l (d_in,l + m·d_out,l) floats per example instead of m·P. Pass 1
  accumulates each op's V-weighted weight gradient M = Σ_j v_j W_j, pass 2
  returns out_i = Σ_p x_ipᵀ M g_ip (:mod:`ntkd.matfree.features`).

``cache="auto"`` keeps the Jacobians when they fit ``cache_bytes``, else the
features when they fit it, else streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from ntkd import ntk
from ntkd.matfree import features as feat
from ntkd.ntk._util import cast, leaf_groups, nbytes
from ntkd.ntk.algorithm import Problem
from ntkd.ntk.modes import Mode
from ntkd.ntk.options import ContractionOptions
from ntkd.ntk.structured import Structured

__all__ = ["NtkMatvec", "ntk_matvec"]

MODES = ("trace", "sum", "logit", "full")
_HIGHEST = jax.lax.Precision.HIGHEST
DIAGONAL_BLOCK = 512
"""Examples per dense diagonal block in :meth:`NtkMatvec.diagonal`."""
JACOBIAN_CHUNK_BYTES = 256 * 2**20
"""Per-example Jacobians (diagonal, cache) are built this many bytes at a time."""
FEATURE_CHUNK_BYTES = 256 * 2**20
"""Feature-cache products take as many columns at once as keep their per-block
temporaries (about one op's cotangents per column) under this many bytes."""
CACHES = ("auto", "never", "always", "features")


class NtkMatvec:
    """``V (size, m) -> K @ V`` for the eNTK; build with :func:`ntk_matvec`.

    Attributes:
      n: examples; k: logits; size: side of K (n, or n·k for ``full``).
      mode: kernel mode; block_size: examples per device per block.
      devices: devices the blocks are sharded over (all processes' devices
        under ``jax.distributed``).
      cache_kind: what is cached: ``"jacobian"`` (per-example Jacobians),
        ``"features"`` (structured per-example features) or None (streaming).
      cached: ``cache_kind is not None``.
      cache_bytes_needed: {"jacobian": bytes, "features": bytes or None} as
        estimated for the choice (features None where not estimated, or where
        the structured plan could not be built).
      calls: products computed; traces: compilations of the block functions
        (stays constant after the first call with a given m).
    """

    def __init__(
        self,
        apply_fn: Callable,
        params: Any,
        x,
        *,
        mode: str,
        logit: int,
        block_size: int,
        dtype,
        cache: str,
        cache_bytes: int,
        max_cotangents: int,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}.")
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
        x = np.asarray(x)
        if dtype is not None:  # inexact leaves only: integer inputs (token ids) stay integers
            params = cast(params, dtype)
            x = x.astype(dtype) if np.issubdtype(x.dtype, np.inexact) else x
        for name, tree in (("params", params), ("x", x)):
            for leaf in jax.tree_util.tree_leaves(tree):
                if not np.all(np.isfinite(np.asarray(leaf))):
                    raise ValueError(f"{name} has non-finite entries; the kernel would be NaN.")
        self.apply_fn, self.mode, self.logit = apply_fn, mode, int(logit)
        self.n = x.shape[0]
        out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        if len(out.shape) != 2:
            raise ValueError(f"apply_fn must return (batch, k) logits, got shape {out.shape}.")
        self.k = int(out.shape[1])
        self.out_dtype = out.dtype
        if mode == "logit" and not 0 <= self.logit < self.k:
            raise ValueError(f"logit={logit} out of range for k={self.k} outputs.")
        self.size = self.n * self.k if mode == "full" else self.n
        self.devices = jax.devices()
        self._multi = jax.process_count() > 1
        ndev = len(self.devices)
        # never more than the data: a padded block still costs its full size (a CNN at n = 64
        # with block_size 512 spent minutes building Jacobians of padding)
        self.block_size = min(int(block_size), math.ceil(self.n / ndev))
        if not isinstance(max_cotangents, (int, np.integer)) or max_cotangents < 1:
            raise ValueError(f"max_cotangents must be a positive int, got {max_cotangents!r}.")
        self.max_cotangents = int(max_cotangents)
        self._B = self.block_size * ndev
        self._nb = math.ceil(self.n / self._B)
        pad = self._nb * self._B - self.n
        self._x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        mesh = self._mesh = Mesh(np.array(self.devices), ("data",))
        self._shard = NamedSharding(mesh, PartitionSpec("data"))
        self._repl = NamedSharding(mesh, PartitionSpec())
        self.params = jax.tree_util.tree_map(lambda a: self._put(np.asarray(a), self._repl), params)
        flat, _ = ravel_pytree(params)
        self.num_params = int(flat.size)
        rows = self.k if mode in ("trace", "full") else 1
        self._jac_bytes = self._nb * self._B * rows * self.num_params * flat.dtype.itemsize
        self.cache_bytes_needed = {"jacobian": self._jac_bytes, "features": None}
        self.calls = 0
        self.traces = 0
        self.cache_kind = None
        if not self._multi:
            if cache == "always" or (cache == "auto" and self._jac_bytes <= cache_bytes):
                self.cache_kind = "jacobian"
            elif cache in ("auto", "features"):
                self._plan_features(required=cache == "features")
                fb = self.cache_bytes_needed["features"]
                if fb is not None and (cache == "features" or fb <= cache_bytes):
                    self.cache_kind = "features"
        self._build()
        self._jac = self._feats = None
        if self.cache_kind == "jacobian":
            self._jac = [self._jacobian_block(i) for i in range(self._nb)]
        elif self.cache_kind == "features":
            self._build_features()
            self._feats = [self._feat_row(self.params, self._block_x(i)) for i in range(self._nb)]

    @property
    def cached(self) -> bool:
        """Whether products run from a cache (Jacobians or features)."""
        return self.cache_kind is not None

    # ---------------------------------------------------------------- features
    def _plan_features(self, required: bool) -> None:
        """Builds the structured plan and estimates the feature cache's bytes.

        Sets ``cache_bytes_needed["features"]`` (left None where the plan
        cannot be built; then ``required`` raises).
        """
        x_one = jax.ShapeDtypeStruct((1, *self._x.shape[1:]), self._x.dtype)
        try:
            apply, params = ntk.as_apply_fn(self.apply_fn, self.params)
            mode = Mode(self.mode, self.logit if self.mode == "logit" else 0)
            problem = Problem(
                apply.fn,
                mode,
                self.k,
                self.out_dtype,
                tuple(leaf_groups(params)),
                False,
                ContractionOptions(),
            )
            algo = Structured.build(problem, params, apply.state, x_one)
            spec = jax.ShapeDtypeStruct((self._B, *self._x.shape[1:]), self._x.dtype)
            shapes = jax.eval_shape(lambda p, xb: algo.row(p, apply.state, xb), params, spec)
        except Exception as e:  # any failure means: no structured plan for this model
            if required:
                raise ValueError(
                    "cache='features' needs the structured plan of the model "
                    f"(ntkd.ntk.structured), which could not be built: {type(e).__name__}: {e}. "
                    "Use cache='auto' (streams), cache='always' (per-example Jacobians) or "
                    "cache='never'."
                ) from e
            return
        self._structured, self._state = algo, apply.state
        self._kinds = [t.kind for t in algo.fact]
        self._rows = [_table_rows(t) for t in algo.fact]
        self._feat_col_bytes = feat.column_bytes(shapes)
        self.cache_bytes_needed["features"] = self._nb * nbytes(shapes)

    def _build_features(self) -> None:
        algo, state, kinds, rows = self._structured, self._state, self._kinds, self._rows
        full, B, k = self.mode == "full", self._B, self.k

        def contrib(F, Vb):
            return feat.pass1(kinds, rows, full, F, Vb.reshape(B, k, -1) if full else Vb)

        def row(params, xb):
            self.traces += 1
            return algo.row(params, state, xb)

        def p1(G, F, Vb):
            self.traces += 1
            return jax.tree.map(jnp.add, G, contrib(F, Vb))

        def p2(F, G):
            self.traces += 1
            out = feat.pass2(kinds, full, F, G)
            return out.reshape(B * k, -1) if full else out

        def diag(F):
            self.traces += 1
            return feat.diagonal(kinds, full, F).reshape(-1)

        def zero(F, Vb):  # pass 1's accumulator: replicated zeros
            shapes = jax.eval_shape(contrib, F, Vb)
            return jax.tree.map(lambda s: self._put(np.zeros(s.shape, s.dtype), self._repl), shapes)

        self._feat_row = jax.jit(row, out_shardings=self._shard)
        self._feat_zero = zero
        self._feat_pass1 = jax.jit(p1, donate_argnums=0, out_shardings=self._repl)
        self._feat_pass2 = jax.jit(p2, out_shardings=self._shard)
        self._feat_diag = jax.jit(diag)

    # ---------------------------------------------------------------- kernels
    def _cotangents(self, Vb, dtype):
        """(c, B, k) cotangents for the block's columns Vb."""
        k, B = self.k, self._B
        if self.mode == "trace":
            m = Vb.shape[1]
            eye = jnp.eye(k, dtype=dtype)
            return (eye[:, None, None, :] * Vb.T[None, :, :, None].astype(dtype)).reshape(
                k * m, B, k
            )
        if self.mode == "sum":
            return jnp.broadcast_to(Vb.T[:, :, None].astype(dtype), (Vb.shape[1], B, k))
        if self.mode == "logit":
            return Vb.T[:, :, None].astype(dtype) * jax.nn.one_hot(self.logit, k, dtype=dtype)
        return jnp.transpose(Vb.reshape(B, k, -1).astype(dtype), (2, 0, 1))

    def _reduce(self, outs, m):
        """(c, B, k) JVP outputs -> (B·[k], m) block of K V."""
        k, B = self.k, self._B
        if self.mode == "trace":
            return jnp.einsum("ajia->ij", outs.reshape(k, m, B, k))
        if self.mode == "sum":
            return outs.sum(-1).T
        if self.mode == "logit":
            return outs[:, :, self.logit].T
        return jnp.transpose(outs, (1, 2, 0)).reshape(B * k, m)

    def _build(self):
        apply_fn = self.apply_fn

        def pass1(G, params, xb, Vb):
            self.traces += 1
            out, vjp = jax.vjp(lambda p: apply_fn(p, xb), params)
            g = jax.vmap(lambda c: vjp(c)[0])(self._cotangents(Vb, out.dtype))
            return jax.tree_util.tree_map(jnp.add, G, g)

        def pass2(params, xb, G, m):
            self.traces += 1
            f = lambda p: apply_fn(p, xb)  # noqa: E731
            outs = jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(G)
            return self._reduce(outs, m)

        self._pass1 = jax.jit(pass1, donate_argnums=0, out_shardings=self._repl)
        self._pass2 = jax.jit(pass2, static_argnums=3, out_shardings=self._shard)

        def jac_pass1(J, Vb):
            self.traces += 1
            if J.ndim == 2:
                return jnp.matmul(J.T, Vb.astype(J.dtype), precision=_HIGHEST)
            if self.mode == "trace":
                return jnp.einsum("iap,im->amp", J, Vb.astype(J.dtype), precision=_HIGHEST)
            return jnp.einsum(
                "iap,iam->mp",
                J,
                Vb.reshape(self._B, self.k, -1).astype(J.dtype),
                precision=_HIGHEST,
            )

        def jac_pass2(J, G):
            self.traces += 1
            if J.ndim == 2:
                return jnp.matmul(J, G, precision=_HIGHEST)
            if self.mode == "trace":
                return jnp.einsum("iap,amp->im", J, G, precision=_HIGHEST)
            return jnp.einsum("iap,mp->iam", J, G, precision=_HIGHEST).reshape(self._B * self.k, -1)

        self._jac_pass1 = jax.jit(jac_pass1, out_shardings=self._repl)
        self._jac_pass2 = jax.jit(jac_pass2, out_shardings=self._shard)

        def per_example(params, xb):
            self.traces += 1

            def one(xi):
                jac = jax.jacrev(lambda p: apply_fn(p, xi[None])[0])(params)
                leaves = jax.tree_util.tree_leaves(jac)
                return jnp.concatenate([leaf.reshape(self.k, -1) for leaf in leaves], axis=1)

            J = jax.vmap(one)(xb)  # (b, k, P)
            if self.mode == "sum":
                return J.sum(1)
            if self.mode == "logit":
                return J[:, self.logit]
            return J

        # Per device, with no SPMD partitioning of the vmapped Jacobian: on JAX 0.10 / CPU a
        # batch-sharded jit(vmap(jacrev)) of a convolution gave wrong rows on devices 1..D-1
        # (products ~50 % off on 4 devices); shard_map computes each slice where it lives.
        self._per_example = jax.jit(
            jax.shard_map(
                per_example,
                mesh=self._mesh,
                in_specs=(PartitionSpec(), PartitionSpec("data")),
                out_specs=PartitionSpec("data"),
                check_vma=False,
            )
        )

    def _put(self, host: np.ndarray, sharding) -> jax.Array:
        if not self._multi:
            return jax.device_put(host, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def _get(self, arr: jax.Array) -> np.ndarray:
        if not self._multi:
            return np.asarray(arr)
        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))

    def _block_x(self, i):
        return self._put(self._x[i * self._B : (i + 1) * self._B], self._shard)

    def _jacobian_block(self, i) -> jax.Array:
        """Per-example Jacobian rows of superblock i: (B, k, P) or (B, P)."""
        xb = self._x[i * self._B : (i + 1) * self._B]
        rows = self.k if self.mode in ("trace", "full") else 1
        ndev = len(self.devices)
        chunk = max(
            ndev, (JACOBIAN_CHUNK_BYTES // max(rows * self.num_params * 8, 1)) // ndev * ndev
        )
        chunk = min(chunk, self._B)
        parts = []
        for s in range(0, self._B, chunk):
            xs = xb[s : s + chunk]
            if xs.shape[0] < chunk:  # keep one compiled shape
                xs = np.concatenate([xs, np.zeros((chunk - xs.shape[0], *xs.shape[1:]), xs.dtype)])
            parts.append(
                self._per_example(self.params, jax.device_put(xs, self._shard))[
                    : min(chunk, self._B - s)
                ]
            )
        return jax.device_put(jnp.concatenate(parts), self._shard)

    # ---------------------------------------------------------------- API
    def __call__(self, V) -> np.ndarray:
        """K @ V for V (size, m) (or (size,)); returns a NumPy array of that shape."""
        V_np = np.asarray(V)
        vec = V_np.ndim == 1
        V_np = V_np[:, None] if vec else V_np
        if V_np.ndim != 2 or V_np.shape[0] != self.size:
            raise ValueError(
                f"V has shape {np.shape(V)}; mode={self.mode!r} on n={self.n} examples "
                f"with k={self.k} logits needs ({self.size}, m) or ({self.size},)."
            )
        m = V_np.shape[1]
        rows = self.k if self.mode == "full" else 1
        pad = self._nb * self._B * rows - self.size
        dtype = self.out_dtype
        Vp = np.concatenate([V_np, np.zeros((pad, m), V_np.dtype)]) if pad else V_np
        Vp = Vp.astype(dtype)
        step = self._B * rows
        blocks = [self._put(Vp[i * step : (i + 1) * step], self._shard) for i in range(self._nb)]
        out = np.empty((self._nb * step, m), dtype)
        if self.cache_kind == "features":
            # columns in chunks that keep the per-block temporaries under FEATURE_CHUNK_BYTES
            mc = max(1, FEATURE_CHUNK_BYTES // max(self._feat_col_bytes, 1))
            for c0 in range(0, m, mc):
                cols = slice(c0, min(c0 + mc, m))
                G = self._feat_zero(self._feats[0], blocks[0][:, cols])
                for F, Vb in zip(self._feats, blocks):
                    G = self._feat_pass1(G, F, Vb[:, cols])
                for i, F in enumerate(self._feats):
                    out[i * step : (i + 1) * step, cols] = np.asarray(self._feat_pass2(F, G))
        elif self.cache_kind == "jacobian":
            G = None
            for J, Vb in zip(self._jac, blocks):
                g = self._jac_pass1(J, Vb)
                G = g if G is None else G + g
            for i, J in enumerate(self._jac):
                out[i * step : (i + 1) * step] = np.asarray(self._jac_pass2(J, G))
        else:
            # columns in chunks so that at most max_cotangents VJPs/JVPs are
            # vmapped at once (their activations dominate the memory)
            per_col = self.k if self.mode == "trace" else 1
            mc = max(1, self.max_cotangents // per_col)
            for c0 in range(0, m, mc):
                cols = slice(c0, min(c0 + mc, m))
                width = cols.stop - cols.start
                G = jax.tree_util.tree_map(
                    lambda p: self._put(np.zeros((per_col * width, *p.shape), p.dtype), self._repl),
                    self.params,
                )
                for i, Vb in enumerate(blocks):
                    G = self._pass1(G, self.params, self._block_x(i), Vb[:, cols])
                for i in range(self._nb):
                    out[i * step : (i + 1) * step, cols] = self._get(
                        self._pass2(self.params, self._block_x(i), G, width)
                    )
        self.calls += 1
        out = out[: self.size]
        return out[:, 0] if vec else out

    def diagonal(self) -> np.ndarray:
        """Exact diag K (size,): from the cached Jacobians or features, else from
        the dense diagonal blocks of ``ntkd.ntk.empirical_ntk``.

        The blocks cost about one block row of K per block (b² pairs), far less
        than n per-example Jacobians.
        """
        d = []
        axes = (2,) if self.mode == "full" else ((1, 2) if self.mode == "trace" else (1,))
        if self.cache_kind == "features":  # Σ_t Σ_{p,q} (x_ip·x_iq)(g_ip·g_iq) per example
            d = [np.asarray(self._feat_diag(F)) for F in self._feats]
            return np.concatenate(d)[: self.size].astype(np.float64)
        if self.cache_kind == "jacobian":  # the cached per-example Jacobians give it for free
            for J in self._jac:
                d.append(np.asarray(jnp.sum(J * J, axis=axes)).reshape(-1))
            return np.concatenate(d)[: self.size].astype(np.float64)
        if self._multi:  # the dense engine is single-process: per-example Jacobians
            for i in range(self._nb):
                J = self._per_example(self.params, self._block_x(i))
                d.append(self._get(jnp.sum(J * J, axis=axes)).reshape(-1))
            return np.concatenate(d)[: self.size].astype(np.float64)
        b = min(self._B, DIAGONAL_BLOCK)
        for s in range(0, self.n, b):
            xb = jnp.asarray(self._x[s : min(s + b, self.n)])
            Kb = np.asarray(
                ntk.empirical_ntk(self.apply_fn, self.params, xb, mode=self.mode, logit=self.logit)
            )
            if self.mode == "full":
                d.append(np.einsum("iiaa->ia", Kb).reshape(-1))
            else:
                d.append(np.diagonal(Kb))
        return np.concatenate(d).astype(np.float64)

    def trace(self) -> float:
        """Exact tr K."""
        return float(np.sum(self.diagonal()))


def _table_rows(t) -> int | None:
    """Table rows of a lookup target (None for dense / convolution ops)."""
    return int(t.eqn.invars[0].aval.shape[0]) if t.kind == "embed" else None


def ntk_matvec(
    apply_fn: Callable,
    params: Any,
    x: ArrayLike,
    *,
    mode: str = "trace",
    logit: int = 0,
    block_size: int = 512,
    dtype: DTypeLike | None = None,
    cache: str = "auto",
    cache_bytes: int = 2**30,
    max_cotangents: int = 20,
) -> NtkMatvec:
    """Streaming eNTK product ``V -> K @ V`` on inputs x, never forming K.

    Two passes over the data per product (VJPs, then JVPs, block by block),
    each block function compiled once per number of columns m; blocks are
    sharded over all local devices. Both passes become matmuls over a cache
    (one process only; several processes always stream):

    - ``cache="always"``: the per-example Jacobians, (padded n) · r · P · 8
      bytes in float64 (r = k in ``trace`` / ``full``, else 1);
    - ``cache="features"``: the structured algorithm's per-example features
      (every dense / conv / embedding op's inputs and output cotangents, the
      other parameters' flat gradients; :mod:`ntkd.ntk.structured`), bytes per
      example (``jax.eval_shape`` of one block) × padded n: for an MLP about
      Σ_l (d_in,l + m·d_out,l) floats per example instead of m·P. Raises
      ValueError if the model's structured plan cannot be built;
    - ``cache="auto"``: the Jacobians if they fit ``cache_bytes``, else the
      features if they fit it, else streaming (``.cache_kind`` says which);
    - ``cache="never"``: streaming.

    Modes as in ``ntkd.ntk.empirical_ntk`` (``trace`` is the
    SUM over logits); ``full`` takes V (n·k, m) with row index ``i·k + a``.

    Args:
      apply_fn: ``apply_fn(params, x) -> (batch, k)``; examples independent
        (eval mode), e.g. from ``ntkd.ntk.flax_apply_fn``.
      params: a parameter pytree.
      x: (n, ...) inputs (host array).
      mode: ``"trace"``, ``"sum"``, ``"logit"`` or ``"full"``.
      logit: the logit of ``mode="logit"``.
      block_size: examples per device per block (the last block is padded; at most
        ceil(n / devices)).
      dtype: cast params and inputs (e.g. ``jnp.float64`` with x64 enabled).
      cache: ``"auto"``, ``"always"`` (Jacobians), ``"features"`` or ``"never"``.
      cache_bytes: cache budget for ``"auto"`` (Jacobians, then features).
      max_cotangents: VJPs / JVPs vmapped at once (trace mode needs k per
        column); memory ≈ max_cotangents × block × activations. Columns beyond
        it are done in further passes.

    Returns:
      An :class:`NtkMatvec` (callable; ``.trace()``, ``.diagonal()``).

    Example:
      >>> mv = ntk_matvec(apply_fn, params, x, mode="trace", block_size=512)
      >>> KV = mv(np.ones((x.shape[0], 3)))   # (n, 3)
    """
    return NtkMatvec(
        apply_fn,
        params,
        x,
        mode=mode,
        logit=logit,
        block_size=block_size,
        dtype=dtype,
        cache=cache,
        cache_bytes=cache_bytes,
        max_cotangents=max_cotangents,
    )
