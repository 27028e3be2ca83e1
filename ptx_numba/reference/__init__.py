"""The ``reference`` backend: NumPy, float64 throughout, written to be read. The executable spec.

Every other backend must compute the same row statistics and gradients (within the numerics
contract, :mod:`ptx_numba.contract`) on every valid input; the conformance suite
(``tests/test_conformance.py``) checks that op by op.
"""
from __future__ import annotations

from .backward import row_grad
from .rowpass import row_stats


class ReferenceBackend:
    """NumPy float64 implementation of the row-pass protocol (:mod:`ptx_numba._rowpass`)."""

    name = "reference"

    def is_available(self) -> tuple[bool, str]:
        """The reference needs only NumPy, so it is always available."""
        return True, ""

    row_stats = staticmethod(row_stats)
    row_grad = staticmethod(row_grad)


BACKEND = ReferenceBackend()

