"""Tuning options, as frozen dataclasses passed in (no mutable module globals).

Every default below was measured on a 2-core x86-64 CPU; docs/ntk.md gives
the numbers behind each one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """How the driver splits a kernel into blocks and where it assembles them.

    Attributes:
        block_size: examples per block (rounded up to a multiple of the local
            device count); None: planned from ``memory_bytes`` and XLA's memory
            plan, then split into at least ``min_blocks`` blocks.
        memory_bytes: working-memory budget per block; None: a quarter of the
            first device's memory (host RAM on CPU), clamped to 1–8 GiB.
        feature_cache_bytes: per-block features up to this total are kept for reuse.
        device_kernel_bytes: kernels up to this size are assembled on device;
            larger ones (or ``as_numpy=True``) stream into a host buffer.
        serial_feature_bytes: on CPU, blocks whose features reach this size run
            one execution at a time (overlapping executions thrash the caches).
        min_blocks: the planned block size splits n into at least this many
            blocks (half as many when every pair is plain matmuls).
        min_block_size: smallest planned block from that split (half in ``full``).
        max_block_size: cap on the planned block size.
    """

    block_size: int | None = None
    memory_bytes: int | None = None
    feature_cache_bytes: int = 4 * 2**30
    device_kernel_bytes: int = 2 * 2**30
    serial_feature_bytes: int = 256 * 2**20
    min_blocks: int = 8
    min_block_size: int = 128
    max_block_size: int = 2048

    def __post_init__(self):
        b = self.block_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"block_size={b!r} must be a positive int or None.")


@dataclasses.dataclass(frozen=True)
class ContractionOptions:
    """Knobs of the feature and pair computations.

    Attributes:
        gram_chunk_bytes: bytes of both operands per step of a long Gram
            contraction (about L2/L3 size).
        gram_chunk_min_depth: only Grams contracting at least this many times
            as many columns as they have rows (r1 + r2) run in chunks; shallower
            ones are one matmul (the chunks' slicing costs more than it saves).
        symmetric_min_rows, symmetric_min_depth, symmetric_max_depth_ratio: a
            diagonal block's Gram ``a @ a.T`` of r rows and K columns is three
            half blocks (the fourth mirrored, 3/4 of the flops) when r ≥
            ``symmetric_min_rows`` and ``symmetric_min_depth`` ≤ K ≤
            ``symmetric_max_depth_ratio`` · r. Shallow Grams do not pay for
            assembling the halves; deep ones lose more to the halves' skinnier
            matmuls than the quarter saves. Measured on 2 CPU cores, kernel
            medians, variants alternating: halves of every depth against none
            on the 2-D CNN `trace`, n = 500 (125 × 46 400 diagonal pairs),
            1.11–1.13× slower; the MLP `trace` at n = 128 (a 128 × 2560 Gram,
            depth 20 × rows) 0.94× the time with the cap at 16 × rows instead
            of 32 (3.4 → 3.2, 3.53 → 3.29, 3.40 → 3.19 ms in three runs of
            back-to-back calls; 4.00 → 4.04 ms with 2 ms idle between calls;
            the 2-D CNN's 64 × 1569 and 63 × 1569 Grams, also between the two
            caps: 0.96–0.99×, within noise). Isolated, 128 × 2560 took 0.81 ms by
            halves and 0.59 ms as one matmul, 128 × 785 0.30 and 0.38 ms.
        cotangent_loop_max: up to this many cotangents per example, the
            structured algorithm unrolls one VJP per cotangent in networks with
            convolutions (vmapping them broadcasts some residuals m times).
        wide_grad_ratio: a layer's per-example weight gradients (a batched matmul
            contracting its S positions) are produced with the m·C cotangent
            columns last, then transposed back, when there are at least this many
            times as many of them as input columns D; otherwise D comes last.
            Isolated on 2 CPU cores (b = 64, medians, alternating), time with the
            cotangent columns last over D last: (S, D, m·C) = (196, 10, 80) 0.48,
            (196, 10, 160) 0.61, (196, 10, 320) 0.51, (784, 10, 160) 0.85, (49, 28,
            320) 0.63, (49, 64, 320) 0.68, (196, 28, 160) 0.77; below the ratio
            (196, 64, 160) 1.06, (49, 145, 320) 0.95, (49, 145, 160) 1.12, (196, 145,
            160) 0.99, (16, 577, 640) 0.99. In context, the 2-D CNN `trace` at
            n = 64 (its first convolution, D = 10, m·C = 160) took 0.934 and 0.963
            × the time in two runs (and 0.944× against this option at inf); its
            `full` kernel 0.999×; at 2, which also moves its 145 × 320 layer (0.95
            isolated), the `trace` kernel ran 1.19× and 1.46× slower. Elsewhere the
            layers it moves (a 1-D CNN's first convolution, ResNet-20's first and
            1×1 shortcut convolutions) kept their kernels within noise: 1-D CNN
            n = 256 `trace` 1.017×, `full` 1.013×; ResNet-20 n = 32 `trace` 1.007×,
            `full` 0.998× (medians of paired ratios).
        separate_grad_size: per-example gradient blocks of at least this many
            entries (m × parameters) stay separate feature arrays.
        max_fact_positions: above this many positions a layer is never factorised.
        collapse_trace: in ``trace`` mode, sum the k output cotangents of a
            dense head and of the layer before it into one
            (``ntkd.ntk.structured.collapse``; exact, k times cheaper pairs).
        separable_pool: a convolution whose output reaches a linear head through
            elementwise ops and sums over its positions only (global average
            pooling, as after a ResNet's last convolution) has cotangents
            D_i[s, c] · V[c, a]; its block is then Σ_c V[c, a] V[c, b] times
            per-channel Grams of one weight gradient per example, not of k
            (``ntkd.ntk.structured.collapse.separable``; exact, about k² times
            fewer flops for that layer in ``full`` mode, k in the scalar modes).
    """

    gram_chunk_bytes: int = 3 * 2**20
    gram_chunk_min_depth: int = 32
    symmetric_min_rows: int = 64
    symmetric_min_depth: int = 512
    symmetric_max_depth_ratio: float = 16.0
    cotangent_loop_max: int = 16
    wide_grad_ratio: float = 4.0
    separate_grad_size: int = 4096
    max_fact_positions: int = 256
    collapse_trace: bool = True
    separable_pool: bool = True
