"""The cross-entropy family: :func:`cross_entropy`, :func:`logsumexp`, :func:`ptx_loss` and their
gradients :func:`cross_entropy_and_grad`, :func:`ptx_loss_and_grad`.

Each validates its input once (:func:`ptx_numba._validate.prepare`), runs the backend's row pass
(and for gradients the gradient pass) and finishes in float64 (:mod:`ptx_numba._finish`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _finish, _ops, config
from ._rowpass import StatsSpec
from ._validate import check_finite_scalar, check_ignore_index, check_reduction, prepare


class PTXLoss(NamedTuple):
    """Result of :func:`ptx_loss`: Python floats, unrounded.

    ``tuple(round(v, 6) for v in result)`` gives the classic ``(total, ptx, ce)`` tuple.
    """

    total: float  #: ``rl_loss + ptx``
    ptx: float  #: ``beta * ce``
    ce: float  #: mean cross entropy over non-ignored rows (0.0 if there are none)


def _ce_options(label_smoothing, z_loss, softcap) -> tuple[float, float, StatsSpec]:
    eps = _ops.check_label_smoothing(label_smoothing)
    lam = _ops.check_z_loss(z_loss)
    cap = _ops.check_softcap(softcap)
    return eps, lam, StatsSpec(softcap=cap, target=True, dsum=eps > 0.0)


def _ce_rows(logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend):
    ignore_index = check_ignore_index(ignore_index)
    if labels is None:
        raise TypeError("labels is None; expected an array")
    eps, lam, spec = _ce_options(label_smoothing, z_loss, softcap)
    batch = prepare(logits, labels, ignore_index=ignore_index)
    st, name = _ops.stats(batch, spec, backend)
    rows = _finish.cross_entropy(st, batch.valid, batch.vocab, eps, lam)
    return batch, rows, st, name, (eps, lam, spec)


def cross_entropy(
    logits: Any,
    labels: Any,
    *,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
):
    """Cross entropy of integer labels under softmax(logits), fused in one pass per row.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised scores. NumPy arrays of any layout or byte order, nested lists, torch tensors,
        anything with ``__array__``/DLPack, or GPU arrays (``__cuda_array_interface__``). float16 and
        bfloat16 are read at their own width and computed in float32; integers become float64.
    labels : array_like of int, shape (...)
        ``labels.shape == logits.shape[:-1]``; each in ``[0, V)`` or equal to ``ignore_index``.
    ignore_index : int, default -100
        Rows with this label contribute nothing and count for nothing in the mean.
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns an array shaped like ``labels`` (float64 for float64 logits, else float32;
        ignored rows 0.0). ``"mean"`` averages over non-ignored rows and returns 0.0 when there are
        none. ``"sum"`` returns the total.
    label_smoothing : float in [0, 1], default 0
        PyTorch's definition: ``(1 - e) * (lse - z_y) + e * (lse - mean_j z_j)`` per row.
    z_loss : float >= 0, default 0
        Adds ``z_loss * lse**2`` per row (PaLM's z-loss).
    softcap : float > 0 or None
        Replaces every logit by ``softcap * tanh(z / softcap)`` before everything else (Gemma 2).
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    float or ndarray
        Per-row results live on the device when the input did.

    Notes
    -----
    ``ce_i = log(sum_j exp(z_ij - m_i)) - (z_i[y_i] - m_i)``, reduced in float64. float32 results are
    within 2e-5 of the float64 value relative to ``max(1, |exact|)`` on any input.
    """
    reduction = check_reduction(reduction)
    batch, rows, _, name, _ = _ce_rows(logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend)
    if reduction == "none":
        return _ops.rows_result(batch, rows, name)
    return _ops.reduce(rows, int(np.count_nonzero(batch.valid)), reduction)


def logsumexp(logits: Any, *, backend: str = "auto"):
    """Log-sum-exp over the last axis.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        As in :func:`cross_entropy`.
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    ndarray, shape logits.shape[:-1]
        float64 for float64 logits, else float32. A row of all ``-inf`` gives ``-inf``; any ``+inf``
        gives ``+inf``; NaN propagates (as :func:`scipy.special.logsumexp`).
    """
    batch = prepare(logits)
    st, name = _ops.stats(batch, StatsSpec(), backend)
    return _ops.rows_result(batch, _finish.lse(st), name)


def ptx_loss(
    rl_loss: Any,
    logits: Any,
    labels: Any,
    beta: Any,
    *,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
) -> PTXLoss:
    """RLHF loss with a pre-training (PTX) term: ``total = rl_loss + beta * mean CE``.

    Parameters
    ----------
    rl_loss : float
        The RL objective's loss value (finite).
    logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend
        As in :func:`cross_entropy`.
    beta : float
        Weight of the pre-training term (finite).

    Returns
    -------
    PTXLoss
        ``(total, ptx, ce)`` as Python floats with ``ptx = beta * ce`` and ``total = rl_loss + ptx``.
        With no valid row, ``ce = ptx = 0`` and ``total = rl_loss``.

    Examples
    --------
    >>> r = ptx_loss(0.5, [[10, 0, 0], [0, 10, 0]], [0, 1], 0.1)
    >>> tuple(round(v, 6) for v in r)
    (0.500009, 9e-06, 9.1e-05)
    """
    rl = check_finite_scalar(rl_loss, "rl_loss")
    b = check_finite_scalar(beta, "beta")
    ce = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean",
                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
    ptx = b * ce
    return PTXLoss(rl + ptx, ptx, ce)


def cross_entropy_and_grad(
    logits: Any,
    labels: Any,
    *,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_output: Any = 1.0,
    out: Any = None,
    backend: str = "auto",
):
    """:func:`cross_entropy` and its gradient with respect to the logits, in two fused passes.

    Parameters
    ----------
    logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, backend
        As in :func:`cross_entropy`.
    grad_output : float or array_like
        Upstream gradient: a scalar for ``"mean"``/``"sum"``, an array shaped like ``labels`` for
        ``"none"``. The gradient returned is that of ``grad_output * loss``.
    out : ndarray, optional
        Where to write the gradient: same shape and dtype as it, writable, not overlapping
        ``labels``. ``out=logits`` is allowed (an in-place backward that saves an N x V buffer);
        by default a new array is returned and the caller's arrays are never written.

    Returns
    -------
    loss : float or ndarray
        As :func:`cross_entropy` returns.
    grad : ndarray
        ``d(grad_output * loss)/d logits``: shape of ``logits``, dtype of ``logits`` for float32,
        float64, float16 and bfloat16 (float64 for integer logits). Ignored rows get 0. On the
        device when the input was.

    Notes
    -----
    One row pass gathers ``m``, ``s`` (and ``mean z`` for label smoothing); a second pass writes
    ``g * (p_j (1 + 2 z_loss lse) - (1 - e) [j = y] - e / V)``, times ``1 - tanh^2`` with a softcap.
    The gradient is formed in float32 (float64 for float64 logits) and rounded to a 16-bit dtype
    last, so the label entry keeps ``p_y - 1`` when ``p_y`` is within an ulp of 1.
    """
    reduction = check_reduction(reduction)
    batch, rows, st, name, (eps, lam, spec) = _ce_rows(logits, labels, ignore_index, label_smoothing,
                                                       z_loss, softcap, backend)
    g = _ops.row_weights(batch, reduction, grad_output)
    coef = _finish.ce_coef(st, g, batch.vocab, eps, lam)
    grad = _grad_buffer(batch, logits, labels, out)
    _ops.grad(batch, spec, st, coef, grad, name)
    loss = (_ops.rows_result(batch, rows, name) if reduction == "none"
            else _ops.reduce(rows, int(np.count_nonzero(batch.valid)), reduction))
    return loss, grad


def _grad_buffer(batch, logits, labels, out):
    if batch.on_device:
        return _ops.device_out(batch, out)
    shape = batch.batch_shape + (batch.vocab,)
    return _ops.check_out(out, logits, labels, _ops.grad_dtype_of(batch, logits), shape)


def ptx_loss_and_grad(
    rl_loss: Any,
    logits: Any,
    labels: Any,
    beta: Any,
    *,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    out: Any = None,
    backend: str = "auto",
) -> tuple[PTXLoss, Any]:
    """:func:`ptx_loss` and ``d total / d logits = beta * d(mean CE)/d logits``.

    Parameters are those of :func:`ptx_loss` plus ``out`` (as in :func:`cross_entropy_and_grad`).

    Returns
    -------
    (PTXLoss, grad)
    """
    rl = check_finite_scalar(rl_loss, "rl_loss")
    b = check_finite_scalar(beta, "beta")
    ce, grad = cross_entropy_and_grad(logits, labels, ignore_index=ignore_index, reduction="mean",
                                      label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                      grad_output=b, out=out, backend=backend)
    ptx = b * ce
    return PTXLoss(rl + ptx, ptx, ce), grad
