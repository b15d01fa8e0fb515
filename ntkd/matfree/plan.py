"""Which path computes the supervision complexity: dense Cholesky or matrix-free."""

from __future__ import annotations

import os

__all__ = ["DENSE_BYTES_PER_ENTRY", "dense_kernel_bytes", "choose_path"]

DENSE_BYTES_PER_ENTRY = 20
"""Peak host bytes per kernel entry of the dense path: the float32/float64
kernel from the engine, its float64 copy and the Cholesky factor (measured:
MNIST-1D MLP, n = 10,000, 3.3 GiB peak RSS incl. ~0.4 GiB of runtime, i.e.
about 30 bytes per entry with the runtime, 20 without)."""


def dense_kernel_bytes(n: int, *, k: int = 1, mode: str = "trace") -> int:
    """Estimated peak bytes of the dense path for n examples (k logits if ``full``)."""
    side = n * k if mode == "full" else n
    return DENSE_BYTES_PER_ENTRY * side * side


def available_bytes() -> int:
    """Free host memory in bytes (``SC_AVPHYS_PAGES``; 8 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def choose_path(
    n: int, *, k: int = 1, mode: str = "trace", memory_budget: int | None = None
) -> str:
    """``"dense"`` if the dense kernel and its factor fit ``memory_budget``, else ``"matfree"``.

    Args:
      n: examples; k: logits (used by ``mode="full"``); mode: eNTK mode.
      memory_budget: bytes (default: half of the currently available host memory).

    >>> choose_path(1000, memory_budget=2**30), choose_path(50_000, memory_budget=8 * 2**30)
    ('dense', 'matfree')
    """
    budget = available_bytes() // 2 if memory_budget is None else int(memory_budget)
    return "dense" if dense_kernel_bytes(n, k=k, mode=mode) <= budget else "matfree"
