"""Matrix-free supervision complexity, spectra and eNTK products (docs/matfree.md)."""

from ntkd.matfree.bounds import (
    ComplexityBounds,
    NystromPreconditioner,
    nystrom_preconditioner,
    shift_from_ridge,
    supervision_complexity_bounds,
)
from ntkd.matfree.lanczos import MatvecError, NotPSDError

__all__ = [
    "ComplexityBounds",
    "MatvecError",
    "NotPSDError",
    "NystromPreconditioner",
    "nystrom_preconditioner",
    "shift_from_ridge",
    "supervision_complexity_bounds",
]
