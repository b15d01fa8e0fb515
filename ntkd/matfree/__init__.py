"""Matrix-free supervision complexity, spectra and eNTK products (docs/matfree.md).

- ``bounds``: certified Gauss / Gauss–Radau bounds on tr(Yᵀ(K + ρI)⁻¹Y) by
  block Lanczos, with an optional Nyström preconditioner.
- ``spectra``: top eigenpairs of K and the target–kernel alignment curve.
- ``matvec``: streaming eNTK products K @ V over data blocks and devices.
- ``projection``: projected eNTK features (random JL projection of gradients).
- ``measure``: many targets' complexities in one eNTK, dense or matrix-free
  (:func:`resolve_path`, :func:`matfree_complexity`), as the toolkit's tables use them.
- ``plan``: whether the dense kernel fits a memory budget (dense vs matrix-free).
- ``lanczos``: the block Lanczos process and the validated operator.
"""

from ntkd.matfree.bounds import (
    ComplexityBounds,
    NystromPreconditioner,
    nystrom_preconditioner,
    shift_from_ridge,
    supervision_complexity_bounds,
)
from ntkd.matfree.lanczos import MatvecError, NotPSDError
from ntkd.matfree.matvec import NtkMatvec, ntk_matvec
from ntkd.matfree.measure import (
    MatfreeComplexity,
    matfree_complexity,
    parse_bytes,
    resolve_path,
)
from ntkd.matfree.plan import choose_path, dense_kernel_bytes
from ntkd.matfree.projection import ProjectedNTK, projected_ntk
from ntkd.matfree.spectra import Eigenpairs, alignment_curve, top_eigenpairs

__all__ = [
    "ComplexityBounds",
    "Eigenpairs",
    "MatfreeComplexity",
    "MatvecError",
    "NotPSDError",
    "NtkMatvec",
    "NystromPreconditioner",
    "ProjectedNTK",
    "alignment_curve",
    "choose_path",
    "dense_kernel_bytes",
    "matfree_complexity",
    "ntk_matvec",
    "nystrom_preconditioner",
    "parse_bytes",
    "projected_ntk",
    "resolve_path",
    "shift_from_ridge",
    "supervision_complexity_bounds",
    "top_eigenpairs",
]
