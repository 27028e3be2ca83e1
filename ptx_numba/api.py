"""Every public function in one import (``from ptx_numba.api import ...``).

The functions live in their family modules: :mod:`ptx_numba.losses` (cross entropy, log-sum-exp,
the PTX loss and their gradients), :mod:`ptx_numba.logprobs` (token log-probs, entropy, KL),
:mod:`ptx_numba.linear` (fused linear cross entropy from hidden states).
"""
from ._dispatch import available_backends
from ._validate import is_device_array
from .errors import BackendUnavailableError, KernelUnavailable
from .linear import linear_cross_entropy, linear_cross_entropy_and_grad, linear_token_logprobs
from .logprobs import entropy, kl_divergence, kl_penalty, token_logprobs
from .losses import PTXLoss, cross_entropy, cross_entropy_and_grad, logsumexp, ptx_loss, ptx_loss_and_grad

__all__ = [
    "BackendUnavailableError", "KernelUnavailable", "PTXLoss", "available_backends", "cross_entropy",
    "cross_entropy_and_grad", "entropy", "is_device_array", "kl_divergence", "kl_penalty",
    "linear_cross_entropy", "linear_cross_entropy_and_grad", "linear_token_logprobs", "logsumexp",
    "ptx_loss", "ptx_loss_and_grad", "token_logprobs",
]
