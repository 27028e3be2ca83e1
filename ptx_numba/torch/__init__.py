"""PyTorch autograd for the fused kernels: ``import ptx_numba.torch as pnt``.

Every op is a :class:`torch.autograd.Function` over the package's row pass. The forward runs one
pass over the logits and keeps only per-row statistics (O(N) float64 numbers, never an N x V
buffer); the backward runs the fused gradient pass, which reads the logits again and writes the
gradient once. CPU tensors are read in place (float32, float64, float16, bfloat16); CUDA tensors
go to the ``cuda`` backend through ``__cuda_array_interface__`` after torch's current stream is
synchronized.

Results are float32 tensors for 16- and 32-bit logits and float64 for float64 logits, on the
logits' device. Gradients have the logits' dtype and are formed in float32 (float64) before the
last rounding, so a bfloat16 gradient keeps ``p_y - 1`` even when ``p_y`` rounds to 1.

The gradient goes into a new tensor by default, so no tensor that autograd may still need is ever
written. ``inplace_backward=True`` (cross entropy only) writes it into the logits' own storage
instead and saves one N x V buffer: afterwards the logits hold the gradient, so they must not be
needed by anything else (another loss, a metric, a later read). Their version counter is bumped,
so an autograd node that saved them and runs later raises instead of using the overwritten values.
"""
from ._autograd import PTXLoss, cross_entropy, entropy, kl_divergence, kl_penalty, ptx_loss, token_logprobs
from ._linear import linear_cross_entropy

__all__ = ["PTXLoss", "cross_entropy", "entropy", "kl_divergence", "kl_penalty", "linear_cross_entropy",
           "ptx_loss", "token_logprobs"]
