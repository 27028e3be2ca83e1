"""The ``cuda`` backend (numba.cuda): the row pass of :mod:`ptx_numba._rowpass` on the GPU.

:data:`BACKEND` provides the protocol's two kernels (:func:`.rowpass.row_stats`,
:func:`.backward.row_grad`) over host blocks (copied to the device) and numba device arrays
(2-D or 3-D, any strides, read in place). The kernels live in :mod:`.kernels` (load / reduce /
finish pieces, the statistics and gradient kernels); numba.cuda is imported on first use, so the
package imports without it.

The folder is not named ``cuda``: numba-cuda's import redirector claims every module path that
contains "numba.cuda", which ``ptx_numba.cuda`` would.
"""
from __future__ import annotations

from .. import config
from ._device import kernels as _kernels
from ._device import numba_cuda as _numba_cuda

NAME = "cuda"

_SIM_HINT = (
    "set NUMBA_ENABLE_CUDASIM=1 before numba is first imported to run the cuda backend on "
    "Numba's CUDA simulator (slow; for testing)"
)


def is_available() -> tuple[bool, str]:
    """Whether the backend can run here: ``(ok, reason)``; never raises.

    True on a machine with a working CUDA driver and GPU, and under the simulator.
    """
    try:
        cuda = _numba_cuda()
    except Exception as exc:
        return False, (
            f"numba.cuda cannot be imported ({type(exc).__name__}: {exc}); install numba-cuda "
            f"(pip install 'ptx_numba[cuda]') on a machine with a CUDA GPU, or {_SIM_HINT}"
        )
    try:
        if _kernels().on_simulator():
            return True, ""
        if cuda.is_available():
            return True, ""
        return False, f"no usable CUDA GPU or driver (numba.cuda.is_available() is False); {_SIM_HINT}"
    except Exception as exc:
        return False, f"numba.cuda failed to initialise ({type(exc).__name__}: {exc}); {_SIM_HINT}"


def prefers_host_input(nbytes: int) -> bool:
    """Whether ``auto`` should send a host batch of ``nbytes`` here: a real GPU and a big batch."""
    if nbytes < config.CUDA_AUTO_MIN_HOST_BYTES:
        return False
    try:
        return not _kernels().on_simulator() and _numba_cuda().is_available()
    except Exception:
        return False


def to_device(host_array):
    """A device copy of a host array (for results the public layer returns on the GPU)."""
    return _numba_cuda().to_device(host_array)


def row_stats(x, y, spec, w=None):
    """See :func:`ptx_numba.gpu.rowpass.row_stats`."""
    from .rowpass import row_stats as run

    return run(x, y, spec, w)


def row_grad(x, y, spec, stats, coef, out, w=None):
    """See :func:`ptx_numba.gpu.backward.row_grad`."""
    from .backward import row_grad as run

    run(x, y, spec, stats, coef, out, w)


class CudaBackend:
    """numba.cuda implementation of the row-pass protocol (:mod:`ptx_numba._rowpass`)."""

    name = NAME

    def is_available(self) -> tuple[bool, str]:
        """``(True, "")`` with a GPU or the simulator, else ``(False, why)``; never raises."""
        return is_available()

    def prefers_host_input(self, nbytes: int) -> bool:
        """Whether ``auto`` should send a host batch of ``nbytes`` here."""
        return prefers_host_input(nbytes)

    row_stats = staticmethod(row_stats)
    row_grad = staticmethod(row_grad)
    to_device = staticmethod(to_device)


BACKEND = CudaBackend()

