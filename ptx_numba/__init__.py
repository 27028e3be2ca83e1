"""ptx_numba: fused row-pass kernels for the RLHF pre-training (PTX) loss and its regularizers.

``total = rl_loss + beta * mean_i CE_i`` with ``CE_i = logsumexp(z_i) - z_i[y_i]`` over an
``[N, V]`` logits matrix, plus token log-probs, entropy and KL, their gradients and fused linear
cross entropy from hidden states, on a NumPy reference, a Numba CPU kernel and a numba.cuda GPU
kernel.

Importing the package compiles nothing: each backend is imported (and its kernels loaded from
Numba's on-disk cache, or compiled) on first use. ``ptx_numba.torch`` (autograd),
``ptx_numba.rlhf`` (loss and reward formulas) and ``ptx_numba.dask`` (scale-out) are imported on
demand.
"""
from .api import (
    BackendUnavailableError,
    KernelUnavailable,
    PTXLoss,
    available_backends,
    cross_entropy,
    cross_entropy_and_grad,
    entropy,
    kl_divergence,
    kl_penalty,
    linear_cross_entropy,
    linear_cross_entropy_and_grad,
    linear_token_logprobs,
    logsumexp,
    ptx_loss,
    ptx_loss_and_grad,
    token_logprobs,
)

__version__ = "0.2.0"

__all__ = [
    "BackendUnavailableError", "KernelUnavailable", "PTXLoss", "available_backends", "cross_entropy",
    "cross_entropy_and_grad", "entropy", "kl_divergence", "kl_penalty", "linear_cross_entropy",
    "linear_cross_entropy_and_grad", "linear_token_logprobs", "logsumexp", "ptx_loss",
    "ptx_loss_and_grad", "token_logprobs", "__version__",
]
