"""ptx_numba: fused cross-entropy kernels for the RLHF pre-training (PTX) loss.

``total = rl_loss + beta * mean_i CE_i`` with ``CE_i = logsumexp(z_i) - z_i[y_i]`` over an
``[N, V]`` logits matrix, on a NumPy reference, a Numba CPU kernel and a numba.cuda GPU kernel.

Importing the package compiles nothing: each backend is imported (and its kernels loaded from
Numba's on-disk cache, or compiled) on first use.
"""
from ._dispatch import BackendUnavailableError, available_backends
from .api import KernelUnavailable, PTXLoss, cross_entropy, logsumexp, ptx_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "KernelUnavailable",
    "PTXLoss",
    "available_backends",
    "cross_entropy",
    "logsumexp",
    "ptx_loss",
    "__version__",
]
