"""One blocking, sharding and multi-host driver for every algorithm.

x1 and x2 are split into equal blocks of examples (the last padded by
repeating an example, the padding cut off). Each block's features are
computed once (``Algorithm.row``/``col``, per device under ``shard_map``)
and reused for every block pair (``Algorithm.pair``); with x2=None only the
upper block pairs are computed and the rest mirrored. Block pairs are
dealt out to processes by block row when ``jax.distributed`` runs several,
and the processes' pieces are summed (every entry is computed by exactly one
process, so the sum is exact).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntkd.ntk._util import finite_of, nbytes
from ntkd.ntk.modes import Mode
from ntkd.ntk.options import BlockOptions


def local_mesh() -> Mesh:
    """1-D mesh (axis ``"d"``) over this process's devices."""
    return Mesh(np.array(jax.local_devices()), ("d",))


class Compiled:
    """An algorithm's row/col (sharded per device) and pair functions, jitted once."""

    def __init__(self, algo, mesh: Mesh):
        self.algo, self.mesh = algo, mesh
        rows = PartitionSpec("d")
        # Features are per example: each device computes its slice of the block with no
        # communication. (On JAX 0.10/CPU, vmap of a conv weight gradient with a batch-sharded
        # input gave wrong values under SPMD partitioning; per-device shard_map is exact.)
        shard = lambda f: jax.jit(
            jax.shard_map(
                f,
                mesh=mesh,
                in_specs=(PartitionSpec(), PartitionSpec(), rows),
                out_specs=rows,
                check_vma=False,
            )
        )
        self.row = shard(algo.row)
        self.col = self.row if algo.shares_features else shard(algo.col)
        self.pair = jax.jit(algo.pair, out_shardings=NamedSharding(mesh, rows))
        # A diagonal block of a symmetric kernel: the algorithm sees one features object
        # twice, so its Grams can use their symmetry (ntkd.ntk._util.gram).
        self.pair_sym = jax.jit(
            lambda p, s, f: algo.pair(p, s, f, f), out_shardings=NamedSharding(mesh, rows)
        )
        self.ndev = mesh.devices.size
        # The whole symmetric kernel of one block on one device in one call: features,
        # pair and the inputs' finiteness flag in one executable (MLP `trace`, n = 128:
        # two dispatches and a host round trip less, and XLA schedules all together).
        self.whole_sym = jax.jit(
            lambda p, s, x: (
                (lambda f: algo.pair(p, s, f, f))(algo.row(p, s, x)),
                finite_of((p, x)),
            )
        )
        self.fused = self.ndev == 1 and algo.shares_features
        self.rows = NamedSharding(mesh, rows)
        self.replicated = NamedSharding(mesh, PartitionSpec())


@functools.cache
def _auto_budget() -> int:
    total = None
    try:
        total = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # memory_stats is optional per backend
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * 2**30
    return int(min(max(total // 4, 2**30), 8 * 2**30))


def memory_budget(opts: BlockOptions) -> int:
    return int(opts.memory_bytes) if opts.memory_bytes is not None else _auto_budget()


def block_from_features(bytes_per_example: int, k: int, mode: Mode, opts: BlockOptions) -> int:
    """Largest block whose row + column features and kernel block fit the budget."""
    out = 4 * (k * k if mode.full else 1)
    budget = memory_budget(opts)
    b = budget // max(2 * bytes_per_example, 1)
    return max(8, int(min(b, math.isqrt(budget // out), opts.max_block_size)))


def planned_bytes(c: Compiled, params, state, xb) -> int | None:
    """Device bytes (output + temporaries) XLA plans for a block's features and one pair.

    None where the backend gives no memory analysis.
    """
    try:
        feat = jax.eval_shape(c.row, params, state, xb)
        need = 0
        for fn, args in ((c.row, (params, state, xb)), (c.pair, (params, state, feat, feat))):
            stats = fn.lower(*args).compile().memory_analysis()
            if stats is None:
                return None
            need = max(need, stats.output_size_in_bytes + stats.temp_size_in_bytes)
        return need + 2 * nbytes(feat)
    except Exception:  # memory analysis is optional on some backends
        return None


def plan_block(
    c: Compiled, mode: Mode, k: int, params, state, x, n: int, opts: BlockOptions
) -> int:
    """Default block size: from the features' size, then XLA's memory plan, then ≥ min_blocks blocks.

    The feature-based guess ignores the temporaries of the row and pair
    computations (e.g. factorised convolutions' block² patch products); the
    compiled ``memory_analysis`` of both shrinks the block until output +
    temporaries fit the budget. Then n is split into at least
    ``min_blocks`` blocks (half as many when every pair is plain matmuls) of
    at least ``min_block_size`` (half in ``full``), evened out so that no block
    is mostly padding.
    """
    ndev = c.ndev
    spec = lambda b: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype)
    feat = jax.eval_shape(c.row, params, state, spec(ndev))
    budget = memory_budget(opts)
    b = min(block_from_features(nbytes(feat) // ndev, k, mode, opts), n)
    floor = ndev * math.ceil(8 / ndev)
    while b > floor:
        b = -(-b // ndev) * ndev
        need = planned_bytes(c, params, state, spec(b))
        if need is None or need <= budget:
            break
        # temporaries grow at most as block², so this ratio lands at or below budget
        b = max(floor, min(b // 2 * 2 - ndev, int(b * 0.9 * math.sqrt(budget / need))))
    spatial = getattr(c.algo, "spatial", False)
    least = opts.min_block_size // 2 if mode.full else opts.min_block_size
    nblocks = opts.min_blocks if mode.full or spatial else max(1, opts.min_blocks // 2)
    b = min(b, max(least, -(-n // nblocks)))
    return -(-n // -(-n // b))  # equal blocks, none mostly padding


def _pad_to(x, n: int):
    if x.shape[0] == n:
        return x
    reps = jnp.broadcast_to(x[-1:], (n - x.shape[0],) + x.shape[1:])
    return jnp.concatenate([x, reps.astype(x.dtype)], axis=0)


def run(
    c: Compiled,
    mode: Mode,
    k: int,
    params,
    state,
    x1,
    x2,
    symmetric: bool,
    block: int,
    opts: BlockOptions,
    as_numpy: bool,
    groups: list,
    dtype,
) -> tuple[dict, jax.Array | None]:
    """(The kernel ``{group: (n1, n2[, k, k])}`` of x1 against x2, block by block; flag).

    ``groups`` names every block the algorithm's ``pair`` returns; ``dtype`` is the kernel's.
    A one-block symmetric kernel on one device also computes, in the same call, whether
    params and x1 are finite: that device scalar is the flag, None for every other kernel.
    """
    ndev, cpu = c.ndev, c.mesh.devices.flat[0].platform == "cpu"
    nproc, rank = jax.process_count(), jax.process_index()

    def ready(out, feats=None):
        # XLA:CPU runs independent executions concurrently on the same cores: with large
        # features, a block's feature pass overlapping the previous pair thrashes both caches
        # (ResNet-20 `full`, n = 256: 16.2-18.1 s dispatched ahead, 15.9 s one at a time).
        if cpu and nbytes(out if feats is None else feats) >= opts.serial_feature_bytes:
            jax.block_until_ready(out)
        return out

    n1, n2 = x1.shape[0], x2.shape[0]
    b = int(min(block, max(n1, n2)))
    b = -(-b // ndev) * ndev  # every block splits evenly over the devices
    starts1, starts2 = list(range(0, n1, b)), list(range(0, n2, b))
    out_shape = mode.block_shape(n1, n2, k)
    shared = symmetric and c.algo.shares_features
    one_block = len(starts1) == len(starts2) == 1 and nproc == 1

    if one_block and ndev == 1:
        # One block on one device: no placement or slicing around the two calls (they cost
        # ~0.5 ms a call, 7 % of the MLP `trace` kernel at n = 128).
        block_of = lambda x, s: _pad_to(x, b)
    else:
        block_of = lambda x, s: jax.device_put(_pad_to(x[s : s + b], b), c.rows)
        params = jax.device_put(params, c.replicated)
        state = jax.device_put(state, c.replicated)

    if one_block:  # stay on device
        finite = None
        if shared and c.fused:
            kij, finite = c.whole_sym(params, state, block_of(x1, 0))
        elif shared:
            kij = c.pair_sym(params, state, c.row(params, state, block_of(x1, 0)))
        else:
            rf = c.row(params, state, block_of(x1, 0))
            kij = c.pair(params, state, rf, c.col(params, state, block_of(x2, 0)))
        cut = lambda v: v if v.shape[:2] == (n1, n2) else v[:n1, :n2]
        return {g: (np.asarray(cut(v)) if as_numpy else cut(v)) for g, v in kij.items()}, finite

    col_cache: dict = {}

    def col_feats(j):
        if j in col_cache:
            return col_cache[j]
        f = ready(c.col(params, state, block_of(x2, starts2[j])))
        if len(starts2) > 1 and nbytes(f) * len(starts2) <= opts.feature_cache_bytes:
            col_cache[j] = f
        return f

    # A kernel that fits device_kernel_bytes is assembled on device (no host round trip,
    # pairs dispatched asynchronously); a larger one, as_numpy=True, or several processes
    # stream block by block into a host buffer.
    itemsize = jnp.dtype(dtype).itemsize
    on_device = (
        not as_numpy and nproc == 1 and math.prod(out_shape) * itemsize <= opts.device_kernel_bytes
    )
    tiles: dict = {}
    host: dict = {}
    for i, s1 in enumerate(starts1):
        if i % nproc != rank:
            continue
        rf = col_feats(i) if shared else ready(c.row(params, state, block_of(x1, s1)))
        for j, s2 in enumerate(starts2):
            if symmetric and j < i:
                continue
            if shared and i == j:
                kij = ready(c.pair_sym(params, state, rf), rf)
            else:
                kij = ready(c.pair(params, state, rf, col_feats(j)), rf)
            e1, e2 = min(b, n1 - s1), min(b, n2 - s2)
            if on_device:
                tiles[i, j] = {g: v[:e1, :e2] for g, v in kij.items()}
                continue
            for g, v in kij.items():
                v = np.asarray(v)
                buf = host.setdefault(g, np.zeros(out_shape, v.dtype))
                buf[s1 : s1 + e1, s2 : s2 + e2] = v[:e1, :e2]
                if symmetric and j > i:
                    buf[s2 : s2 + e2, s1 : s1 + e1] = mode.mirror(v)[:e2, :e1]
        if shared:
            col_cache.pop(i, None)  # later rows only pair with later columns
    if on_device:
        keys = sorted(tiles)
        assemble = _assembler(mode, tuple(keys), len(starts1), len(starts2))
        return assemble([tiles[key] for key in keys]), None
    if nproc > 1:
        host = gather_processes(host, groups, out_shape, dtype)
    return (host if as_numpy else {g: jnp.asarray(v) for g, v in host.items()}), None


@functools.lru_cache(maxsize=64)
def _assembler(mode: Mode, keys: tuple, nb1: int, nb2: int):
    """One compiled function from the computed tiles (``keys``: their (i, j), already cut to
    size) to the kernel: mirrored tiles and both concatenations in one pass over the
    output (eagerly, each mirror and concatenation was its own pass and dispatch: 2-D CNN
    `full`, n = 500, 36 tiles: ~10 % of the kernel's time)."""

    def assemble(computed: list) -> dict:
        tiles = dict(zip(keys, computed))
        get = lambda i, j: (
            tiles[i, j] if (i, j) in tiles else {g: mode.mirror(v) for g, v in tiles[j, i].items()}
        )
        return {
            g: jnp.concatenate(
                [jnp.concatenate([get(i, j)[g] for j in range(nb2)], axis=1) for i in range(nb1)],
                axis=0,
            )
            for g in computed[0]
        }

    return jax.jit(assemble)


def gather_processes(host: dict, groups: list, shape: tuple, dtype) -> dict:
    """Sums every process's share of the kernel (each entry is non-zero on one process only)."""
    from jax.experimental import multihost_utils

    out = {}
    for g in groups:  # the same order in every process
        mine = host.get(g)
        if mine is None:
            mine = np.zeros(shape, dtype)
        out[g] = np.asarray(multihost_utils.process_allgather(mine)).sum(axis=0)
    return out
