"""The autograd Functions of :mod:`ptx_numba.torch` (cross entropy, PTX loss, log-prob family)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _finish, _ops, config
from .. import logprobs as _lp
from .._validate import _torch_to_numpy, check_finite_scalar, check_ignore_index, check_reduction, device_logits, prepare
from ..losses import _ce_options, _ce_rows

_IGNORE = config.DEFAULT_IGNORE_INDEX


# ------------------------------------------------------------------------------------------------
# tensors <-> the core
# ------------------------------------------------------------------------------------------------
def _check_tensor(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")
    return t


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_tensor(rows: np.ndarray, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """float64 per-row values -> a tensor shaped ``shape`` on ``like``'s device, in its result dtype."""
    arr = np.ascontiguousarray(rows, dtype=np.float64).reshape(shape)
    return torch.from_numpy(arr).to(device=like.device, dtype=_result_dtype(like))


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=_result_dtype(like), device=like.device)


def _host(g: torch.Tensor | None, n: int) -> np.ndarray | None:
    """An upstream gradient (0-d, or one value per row) as float64 ``[n]`` on the host."""
    if g is None:
        return None
    flat = g.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.broadcast_to(flat, (n,)) if flat.shape[0] == 1 else flat


def _encoded(t: torch.Tensor):
    """The encoded array of a tensor's storage (writable), as the gradient pass takes ``out``."""
    if t.device.type == "cuda":
        return device_logits(t, "gradient")[0]
    return _torch_to_numpy(t)[0]


def _grad_pass(logits: torch.Tensor, y: np.ndarray, saved: _ops.Saved, coef, *, other=None,
               inplace: bool = False) -> torch.Tensor:
    """Run the fused gradient pass; return the gradient tensor (the logits themselves if ``inplace``).

    ``y`` holds the kernel labels of the forward (-1 = ignored / no label).
    """
    batch = prepare(logits, y.reshape(logits.shape[:-1]), ignore_index=-1, other=other)
    grad = logits.detach() if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    _ops.grad(batch, saved.spec, saved.stats, coef, _encoded(grad), saved.backend)
    if inplace:  # saved copies of the logits are stale now: make autograd notice
        torch.autograd.graph.increment_version(logits)
    return grad


def _valid_rows(g: np.ndarray | None, valid: np.ndarray) -> np.ndarray | None:
    return None if g is None else np.where(valid, g, 0.0)


# ------------------------------------------------------------------------------------------------
# cross entropy and the PTX loss
# ------------------------------------------------------------------------------------------------
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, eps, lam, cap, inplace, backend):
        batch, rows, st, name, (eps, lam, spec) = _ce_rows(logits, labels, ignore_index, eps, lam, cap, backend)
        count = int(np.count_nonzero(batch.valid))
        ctx.save_for_backward(logits)
        ctx.state = (batch.y, batch.vocab, count, reduction, eps, lam, inplace)
        ctx.saved = _ops.Saved(st, spec, name, {"ignore_index": -1})
        if reduction == "none":
            return _rows_tensor(rows, batch.batch_shape, logits)
        return _scalar(_ops.reduce(rows, count, reduction), logits)

    @staticmethod
    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        y, vocab, count, reduction, eps, lam, inplace = ctx.state
        g = _host(grad_out, y.shape[0])
        if reduction == "mean":
            g = g / count if count else np.zeros_like(g)
        g = _valid_rows(g, y >= 0)
        coef = _finish.ce_coef(ctx.saved.stats, g, vocab, eps, lam)
        return (_grad_pass(logits, y, ctx.saved, coef, inplace=inplace),) + (None,) * 8


def cross_entropy(logits: torch.Tensor, labels: Any, ignore_index: int = _IGNORE, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  inplace_backward: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """Differentiable :func:`ptx_numba.cross_entropy` (the semantics of ``F.cross_entropy``).

    Parameters
    ----------
    logits : torch.Tensor, shape (..., V)
        float16, bfloat16, float32 or float64; CPU or CUDA; any strides (``logits[:, :-1]`` is read
        in place).
    labels : torch.Tensor or array_like of int, shape logits.shape[:-1]
    ignore_index : int, default -100
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns a tensor shaped like ``labels`` (0 at ignored rows); ``"mean"`` over the
        non-ignored rows, 0 (with a zero gradient) when there are none.
    label_smoothing, z_loss, softcap
        As in :func:`ptx_numba.cross_entropy`.
    inplace_backward : bool, default False
        Write the gradient into the logits' storage (saves an N x V buffer). The logits are
        overwritten by the backward: use it only when nothing else needs them (see the module
        docstring).
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    torch.Tensor
        0-d for "mean"/"sum"; float32 (float64 for float64 logits) on the logits' device.
    """
    _check_tensor(logits, "logits")
    reduction = check_reduction(reduction)
    if not isinstance(inplace_backward, (bool, np.bool_)):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    return _CrossEntropy.apply(logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap,
                               bool(inplace_backward), backend)


def ptx_loss(rl_loss: Any, logits: torch.Tensor, labels: Any, beta: float, ignore_index: int = _IGNORE,
             label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
             inplace_backward: bool = False, *, backend: str = "auto"):
    """``total = rl_loss + beta * mean CE``, differentiable with respect to ``rl_loss`` and ``logits``.

    Parameters
    ----------
    rl_loss : torch.Tensor (0-d) or float
        The RL objective's loss (e.g. a PPO surrogate); its gradient is 1 in ``total``.
    logits, labels, ignore_index, label_smoothing, z_loss, softcap, inplace_backward, backend
        As in :func:`cross_entropy`.
    beta : float
        Weight of the pre-training term.

    Returns
    -------
    total, ptx, ce : 0-d tensors
        ``ptx = beta * ce`` and ``total = rl_loss + ptx``; ``ce`` is the mean over non-ignored rows.
    """
    b = check_finite_scalar(beta, "beta")
    if isinstance(rl_loss, torch.Tensor):
        if rl_loss.dim() != 0:
            raise ValueError(f"rl_loss must be a scalar (0-d tensor), got shape {tuple(rl_loss.shape)}")
    else:
        rl_loss = check_finite_scalar(rl_loss, "rl_loss")
    ce = cross_entropy(logits, labels, ignore_index, "mean", label_smoothing, z_loss, softcap,
                       inplace_backward, backend=backend)
    ptx = ce * b
    return rl_loss + ptx, ptx, ce


class PTXLoss(nn.Module):
    """``total, ptx, ce = PTXLoss(beta)(rl_loss, logits, labels)``: :func:`ptx_loss` as a module.

    Parameters
    ----------
    beta : float, default 0.1
    ignore_index, label_smoothing, z_loss, softcap, inplace_backward, backend
        As in :func:`cross_entropy`; checked here, once.
    """

    def __init__(self, beta: float = 0.1, ignore_index: int = _IGNORE, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, inplace_backward: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        self.beta = check_finite_scalar(beta, "beta")
        self.ignore_index = check_ignore_index(ignore_index)
        _ce_options(label_smoothing, z_loss, softcap)
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.inplace_backward, self.backend = inplace_backward, backend

    def forward(self, rl_loss, logits, labels):
        """Returns ``(total, ptx, ce)``, 0-d tensors (see :func:`ptx_loss`)."""
        return ptx_loss(rl_loss, logits, labels, self.beta, self.ignore_index, self.label_smoothing,
                        self.z_loss, self.softcap, self.inplace_backward, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, inplace_backward={self.inplace_backward}")


# ------------------------------------------------------------------------------------------------
# token log-probs, entropy, KL
# ------------------------------------------------------------------------------------------------
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, return_entropy, backend):
        batch, st, name, spec = _lp.forward(logits, tokens, temperature=temperature, ignore_index=ignore_index,
                                            entropy=return_entropy, backend=backend)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits)
        ctx.y, ctx.saved = batch.y, _ops.Saved(st, spec, name, {"ignore_index": -1})
        valid = batch.valid
        logp = _rows_tensor(_finish.token_logprob(st, valid), batch.batch_shape, logits)
        if not return_entropy:
            return logp
        return logp, _rows_tensor(np.where(valid, _finish.entropy(st), 0.0), batch.batch_shape, logits)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        (logits,) = ctx.saved_tensors
        y = ctx.y
        g_logp, g_ent = (_valid_rows(_host(g, y.shape[0]), y >= 0) for g in (g_logp, g_ent))
        if g_logp is None and g_ent is None:
            return (None,) * 6
        coef = _finish.logprob_coef(ctx.saved.stats, g_logp=g_logp, g_entropy=g_ent)
        return (_grad_pass(logits, y, ctx.saved, coef),) + (None,) * 5


def token_logprobs(logits: torch.Tensor, tokens: Any, *, temperature: float = 1.0, ignore_index: int = _IGNORE,
                   return_entropy: bool = False, backend: str = "auto"):
    """Differentiable :func:`ptx_numba.token_logprobs`: ``log softmax(logits / T)[token]`` per position.

    Parameters
    ----------
    logits : torch.Tensor, shape (..., V)
    tokens : torch.Tensor or array_like of int, shape logits.shape[:-1]
    temperature : float > 0
    ignore_index : int
        Positions with this token give 0 and get no gradient.
    return_entropy : bool
        Also return the entropy of each position (same single pass); both are differentiable.
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    logp : torch.Tensor shaped like ``tokens``
    entropy : torch.Tensor shaped like ``tokens``, if ``return_entropy`` (0 at ignored positions)
    """
    _check_tensor(logits, "logits")
    if tokens is None:
        raise TypeError("tokens is None; expected an array")
    return _TokenLogprobs.apply(logits, tokens, temperature, ignore_index, bool(return_entropy), backend)


class _RowFunction(torch.autograd.Function):
    """Entropy (``ref_logits is None``) or the exact KL per row: one output, all rows valid."""

    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, backend):
        kl = ref_logits is not None
        batch, st, name, spec = _lp.forward(logits, None, ref_logits=ref_logits, temperature=temperature,
                                            entropy=not kl, full_kl=kl, backend=backend)
        ctx.save_for_backward(logits, ref_logits)
        ctx.y, ctx.saved = batch.y, _ops.Saved(st, spec, name, {"ignore_index": -1})
        rows = _finish.kl(st) if kl else _finish.entropy(st)
        return _rows_tensor(rows, batch.batch_shape, logits)

    @staticmethod
    def backward(ctx, g):
        logits, ref_logits = ctx.saved_tensors
        g = _host(g, ctx.y.shape[0])
        if ref_logits is None:
            coef = _finish.logprob_coef(ctx.saved.stats, g_entropy=g)
        else:
            coef = _finish.logprob_coef(ctx.saved.stats, g_kl=g)
        return _grad_pass(logits, ctx.y, ctx.saved, coef, other=ref_logits), None, None, None


def entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Differentiable :func:`ptx_numba.entropy`: ``H = -sum p log p`` of ``softmax(logits / T)`` per row.

    Returns a tensor of shape ``logits.shape[:-1]``.
    """
    _check_tensor(logits, "logits")
    return _RowFunction.apply(logits, None, temperature, backend)


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
                  backend: str = "auto") -> torch.Tensor:
    """Differentiable :func:`ptx_numba.kl_divergence`: exact ``KL(softmax(z/T) || softmax(w/T))`` per row.

    The gradient flows to ``logits`` only; ``ref_logits`` are treated as constants (as if detached).
    """
    _check_tensor(logits, "logits")
    _check_tensor(ref_logits, "ref_logits")
    return _RowFunction.apply(logits, ref_logits, temperature, backend)


def _estimator_slope(r: np.ndarray, estimator: str) -> np.ndarray:
    """``d estimate / d r`` for k1, abs, k2, k3 (see :func:`ptx_numba.logprobs.estimate`)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if estimator == "k1":
            return np.ones_like(r)
        if estimator == "abs":
            return np.sign(r)
        if estimator == "k2":
            return r
        return -np.expm1(-r)  # k3: 1 - exp(-r)


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, tokens, estimator, temperature, ignore_index, backend):
        full = estimator == "full"
        batch, st, name, spec = _lp.forward(logits, tokens, ref_logits=ref_logits, temperature=temperature,
                                            ignore_index=ignore_index, full_kl=full, backend=backend)
        valid = batch.valid
        if full:
            pen, r = _finish.kl(st), None
        else:
            with np.errstate(invalid="ignore"):
                r = _finish.token_logprob(st, valid) - _finish.ref_token_logprob(st, valid)
            pen = _lp.estimate(r, estimator)
            spec = replace(spec, pair=False)  # the gradient of logp(y) never reads ref_logits
        ctx.save_for_backward(logits, ref_logits if full else None)
        ctx.y, ctx.r, ctx.estimator = batch.y, r, estimator
        ctx.saved = _ops.Saved(st, spec, name, {"ignore_index": -1})
        return _rows_tensor(np.where(valid, pen, 0.0), batch.batch_shape, logits)

    @staticmethod
    def backward(ctx, g):
        logits, ref_logits = ctx.saved_tensors
        y = ctx.y
        g = _valid_rows(_host(g, y.shape[0]), y >= 0)
        if ctx.estimator == "full":
            coef = _finish.logprob_coef(ctx.saved.stats, g_kl=g)
        else:
            with np.errstate(invalid="ignore"):
                g_logp = np.where(g == 0.0, 0.0, g * _estimator_slope(ctx.r, ctx.estimator))
            coef = _finish.logprob_coef(ctx.saved.stats, g_logp=g_logp)
        return (_grad_pass(logits, y, ctx.saved, coef, other=ref_logits),) + (None,) * 6


def kl_penalty(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: Any, *, estimator: str = "k1",
               temperature: float = 1.0, ignore_index: int = _IGNORE, backend: str = "auto") -> torch.Tensor:
    """Differentiable :func:`ptx_numba.kl_penalty`: per-token KL estimate to a reference policy.

    With ``r = logp - ref_logp``: ``k1 = r``, ``abs = |r|``, ``k2 = r**2 / 2``,
    ``k3 = exp(-r) - 1 + r``, ``full`` = the exact KL of the position's distributions. The gradient
    flows to ``logits`` only (the reference policy is frozen); ignored positions give 0.

    Returns a tensor shaped like ``tokens``.
    """
    _check_tensor(logits, "logits")
    _check_tensor(ref_logits, "ref_logits")
    estimator = _lp.check_estimator(estimator)
    if tokens is None:
        raise TypeError("tokens is None; expected an array")
    return _KLPenalty.apply(logits, ref_logits, tokens, estimator, temperature, ignore_index, backend)
