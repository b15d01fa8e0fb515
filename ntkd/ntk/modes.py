"""Kernel modes: which output cotangents, what shape, how blocks contract and mirror.

Every algorithm computes per-example quantities for a *basis* of m output
cotangents per example (one per logit, or a single one) and contracts them
pairwise. A :class:`Mode` owns everything that depends on the mode string, so
the algorithms never branch on it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODES = ("full", "trace", "logit", "sum")
"""Kernel modes; ``trace`` is the SUM over logits (neural-tangents: mean)."""

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Mode:
    """One kernel mode.

    Attributes:
        name: ``"full"`` (n1, n2, k, k) Θ[a, b]; ``"trace"`` (n1, n2) Σ_a Θ[a, a];
            ``"logit"`` (n1, n2) Θ[c, c]; ``"sum"`` (n1, n2) NTK of Σ_a f_a.
        logit: the logit c of ``"logit"``.
    """

    name: str
    logit: int = 0

    def __post_init__(self):
        if self.name not in MODES:
            raise ValueError(f"mode={self.name!r} is unknown; use one of {MODES}.")

    @property
    def full(self) -> bool:
        """Blocks keep the logit pair axes (i, j, a, b)."""
        return self.name == "full"

    def width(self, k: int) -> int:
        """m, the number of output cotangents per example."""
        return k if self.name in ("full", "trace") else 1

    def basis(self, k: int, dtype) -> jax.Array:
        """(m, k) output cotangents.

        ``trace`` needs every logit's gradient but contracts them pairwise
        (a with a); ``logit`` and ``sum`` need one gradient per example.
        """
        if self.name in ("full", "trace"):
            return jnp.eye(k, dtype=dtype)
        if self.name == "logit":
            return jnp.eye(k, dtype=dtype)[self.logit : self.logit + 1]
        return jnp.ones((1, k), dtype)

    def block_shape(self, b1: int, b2: int, k: int) -> tuple:
        return (b1, b2) + ((k, k) if self.full else ())

    def contract(self, f1: jax.Array, f2: jax.Array, gram) -> jax.Array:
        """Block from per-example features f: (b, m, P) (gradients per cotangent).

        ``full`` returns the matmul's natural (i, a, j, b) layout, so several
        terms can be summed before one :meth:`finish`; scalar modes contract
        the m cotangents with each other (a with a) inside the matmul.
        """
        flat = lambda f: f.reshape(f.shape[0] * (f.shape[1] if self.full else 1), -1)  # noqa: E731
        a = flat(f1)
        b = a if f2 is f1 else flat(f2)  # one operand: a symmetric diagonal block
        if self.full:
            (b1, m, _), b2 = f1.shape, f2.shape[0]
            return gram(a, b).reshape(b1, m, b2, m)
        return gram(a, b)

    def finish(self, block: jax.Array) -> jax.Array:
        """(i, a, j, b) → (i, j, a, b) for ``full``; scalar blocks unchanged."""
        return jnp.transpose(block, (0, 2, 1, 3)) if self.full else block

    def from_outputs(self, out: jax.Array) -> jax.Array:
        """Block from pushed-forward outputs out[i, a, j, :] = J(x2_j) J(x1_i)ᵀ e_a: (b1, m, b2, k)."""
        if self.name == "full":
            return jnp.transpose(out, (0, 2, 1, 3))
        if self.name == "trace":
            return jnp.einsum("iaja->ij", out)
        if self.name == "logit":
            return out[:, 0, :, self.logit]
        return out[:, 0].sum(-1)

    def mirror(self, block):
        """The (j, i) block of a symmetric kernel from its (i, j) block."""
        t = block.swapaxes(0, 1)
        return t.swapaxes(2, 3) if self.full else t

    def vector_shape(self, n: int, k: int) -> tuple:
        """Shape of v in ``K @ v``."""
        return (n, k) if self.full else (n,)

    def matvec(self, push, pull, v: jax.Array, n: int, k: int) -> jax.Array:
        """K @ v from the linearised network ``push`` (params → (n, k)) and its transpose ``pull``."""
        if self.name == "full":
            return push(pull(v)[0])
        if self.name == "trace":
            cots = v[None, :, None] * jnp.eye(k, dtype=v.dtype)[:, None, :]
            outs = jax.vmap(lambda c: push(pull(c)[0]))(cots)  # (k, n, k)
            return jnp.einsum("ana->n", outs)
        if self.name == "logit":
            return push(pull(v[:, None] * jax.nn.one_hot(self.logit, k, dtype=v.dtype))[0])[
                :, self.logit
            ]
        return push(pull(jnp.broadcast_to(v[:, None], (n, k)))[0]).sum(-1)
