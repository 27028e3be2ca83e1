"""The ``cpu`` backend: Numba kernels of the row-pass protocol (:mod:`ptx_numba._rowpass`).

Layout:

* :mod:`.rowpass` - the walk over row pieces (plain statistics on the fast loops) and the
  :func:`row_stats` driver; :mod:`.moments` - the walk for every other :class:`StatsSpec`;
  :mod:`.finish` - merging pieces, targets and canonical special rows;
* :mod:`.backward` - the gradient pass :func:`row_grad`;
* :mod:`.threads` - Numba's threading layer: TBB preferred, fork after GNU OpenMP, concurrent calls;
* :mod:`.simd` - the loops: :mod:`.simd.primitives` (vectorizable exp, decoding),
  :mod:`.simd.avx2` (hand-written AVX2 exp-sums), :mod:`.simd.shift` (their shift arithmetic),
  :mod:`.simd.isa` (the ISA markers the walk is compiled for).

Kernels compile on first use (``cache=True``, so later processes load them from Numba's disk
cache). Only a failure to compile or load becomes :class:`~ptx_numba.errors.KernelUnavailable`;
a bad argument raises its own ValueError/TypeError/OverflowError unchanged.
"""
from __future__ import annotations

import numpy as np

from .. import config
from .._rowpass import GradCoef, RowStats, StatsSpec
from ..errors import KernelUnavailable

NAME = "cpu"

try:  # numba is a core dependency, but a broken install must degrade, not break the package
    import numba  # noqa: F401

    from . import backward as _backward
    from . import rowpass as _rowpass
    from . import threads as _threads
    from .rowpass import pieces_per_row  # noqa: F401  (policy, used by tests)

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - exercised only on broken installs
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: Exceptions that describe the caller's input, never the kernel: they propagate unchanged.
_ARGUMENT_ERRORS = (ValueError, TypeError, OverflowError, MemoryError, KeyboardInterrupt)


def _kernel_call(fn, *args):
    """Run a kernel driver; a failure to compile or load becomes KernelUnavailable.

    The call goes through :func:`ptx_numba.cpu.threads.call` (threading layer, fork, concurrency).
    """
    from numba.core.errors import NumbaError

    try:
        return _threads.call(fn, *args)
    except NumbaError as exc:  # typing, lowering or cache-load failures of the first compile
        raise KernelUnavailable(f"the CPU kernel could not be compiled: {type(exc).__name__}: {exc}") from exc
    except _ARGUMENT_ERRORS:
        raise
    except KernelUnavailable:
        raise
    except Exception as exc:  # numba compilation / cache-load failures
        raise KernelUnavailable(f"the CPU kernel could not run: {type(exc).__name__}: {exc}") from exc


class CpuBackend:
    """Numba implementation of the row-pass protocol (see :class:`ptx_numba._rowpass.Backend`)."""

    name = "cpu"

    def is_available(self) -> tuple[bool, str]:
        """The CPU backend needs an importable Numba; compilation problems surface on first use."""
        if _IMPORT_ERROR:
            return False, f"numba could not be imported ({_IMPORT_ERROR})"
        return True, ""

    def row_stats(self, x, y: np.ndarray, spec: StatsSpec, w=None) -> RowStats:
        """The row pass over one block (:func:`ptx_numba.cpu.rowpass.row_stats`)."""
        return _kernel_call(_rowpass.row_stats, x, y, spec, w)

    def row_grad(self, x, y: np.ndarray, spec: StatsSpec, stats: RowStats, coef: GradCoef, out,
                 w=None) -> None:
        """The gradient pass over one block (:func:`ptx_numba.cpu.backward.row_grad`)."""
        return _kernel_call(_backward.row_grad, x, y, spec, stats, coef, out, w)


BACKEND = CpuBackend()


# --------------------------------------------------------------------------------------------
# which loop runs
# --------------------------------------------------------------------------------------------
def loop_isa(dtype: np.dtype) -> str:
    """The ISA whose exp-sum loop the plain statistics of this encoded dtype run on now.

    Parameters
    ----------
    dtype : numpy.dtype
        Encoded logits dtype (float32, float64, uint16 for bfloat16 bits, int16 for float16 bits).

    Returns
    -------
    str
        ``"avx512"``, ``"avx2"`` or ``"portable"`` (see :mod:`ptx_numba.cpu.simd.features`; follows
        ``config.CPU_ISA``, ``$PTX_NUMBA_CPU_ISA`` and ``config.CPU_AVX2``).
    """
    from .simd import isa

    return isa.for_dtype(np.dtype(dtype), config.CPU_AVX2).name
