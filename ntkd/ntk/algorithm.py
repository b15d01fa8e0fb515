"""The protocol every exact algorithm implements, and what it is built from.

An algorithm turns a block of examples into *features* (``row`` / ``col``)
and two blocks' features into a kernel block (``pair``). The driver
(``ntkd.ntk.blocking``) only ever calls these three, so blocking, sharding,
symmetry and multi-host distribution are written once for all algorithms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax

from ntkd.ntk._util import gram
from ntkd.ntk.modes import Mode
from ntkd.ntk.options import ContractionOptions

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Problem:
    """What every algorithm is built from.

    Attributes:
        fn: ``fn(params, state, x) -> (b, k)``; examples independent.
        mode: the kernel mode.
        k: number of logits.
        groups: per params leaf (tree order), its parameter-group path.
        by_layer: ``pair`` returns one block per group instead of their sum.
        options: contraction knobs.
        dtype: the output (logits) dtype; cotangents and kernels use it.
    """

    fn: Callable
    mode: Mode
    k: int
    dtype: Any
    groups: tuple
    by_layer: bool
    options: ContractionOptions

    @property
    def m(self) -> int:
        return self.mode.width(self.k)

    def gram(self, a, b):
        return gram(a, b, self.options)

    def terms(self) -> Terms:
        return Terms(self)


class Algorithm(Protocol):
    """``row``/``col`` give per-block features, ``pair`` a kernel block.

    ``pair`` returns ``{group: block}`` (one entry, ``""``, unless by_layer).
    ``shares_features`` says that ``col`` is ``row``, so with x2=None one
    block's features serve as both.
    """

    shares_features: bool

    def row(self, params: PyTree, state: PyTree, x: jax.Array) -> PyTree: ...

    def col(self, params: PyTree, state: PyTree, x: jax.Array) -> PyTree: ...

    def pair(self, params: PyTree, state: PyTree, r: PyTree, c: PyTree) -> dict: ...


class Terms:
    """Sums kernel terms per parameter group (or all into one, without by_layer)."""

    def __init__(self, problem: Problem):
        self.problem, self.blocks = problem, {}

    def add(self, group: str, block: jax.Array, natural: bool = True) -> None:
        """``natural``: a full-mode block in the matmul's (i, a, j, b) layout."""
        if not natural:
            block = jax.numpy.transpose(block, (0, 2, 1, 3)) if self.problem.mode.full else block
        key = group if self.problem.by_layer else ""
        self.blocks[key] = block if key not in self.blocks else self.blocks[key] + block

    def result(self, shape: tuple, dtype) -> dict:
        mode = self.problem.mode
        out = {g: mode.finish(b) for g, b in self.blocks.items()}
        wanted = sorted(set(self.problem.groups)) if self.problem.by_layer else [""]
        for g in wanted:  # a group with no terms (e.g. no parameters reach the output)
            if g not in out:
                out[g] = jax.numpy.zeros(shape, dtype)
        return out
