"""Differentiable fused linear cross entropy (:func:`linear_cross_entropy`).

Gradients: for ``reduction="mean"``/``"sum"`` the forward already runs the gradient pass chunk by
chunk (upstream gradient 1) and keeps ``d_hidden``, ``d_weight``, ``d_bias`` — the size of the
inputs and parameters, never N x V — and the backward only scales them by the upstream scalar, so
the logits matmul runs once per step instead of twice. For ``reduction="none"`` each row has its own
upstream gradient, which is known only in the backward, so the backward recomputes the chunks.

CPU tensors go to :func:`ptx_numba.linear_cross_entropy_and_grad` (NumPy's BLAS); CUDA tensors
take the same chunk loop here with torch's matmuls (cuBLAS) and the ``cuda`` backend's kernels on
each chunk.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _finish, _ops, config
from .. import linear as _core
from .._validate import check_ignore_index, check_reduction, prepare
from ..losses import _ce_options
from ._autograd import _encoded

_IGNORE = config.DEFAULT_IGNORE_INDEX


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == weight.dtype == torch.float64 else torch.float32


def _check(hidden, weight, bias):
    for what, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")
    devices = {t.device for t in (hidden, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D] (the nn.Linear layout), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden shape {tuple(hidden.shape)} does not match weight shape {tuple(weight.shape)}: "
                         f"expected hidden.shape[-1] == weight.shape[1] == {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight: expected ({weight.shape[0]},)")


def _run(hidden, weight, bias, labels, opts, grad_output):
    """``(loss, d_hidden, d_weight, d_bias)`` tensors (the gradients None when ``grad_output`` is)."""
    if hidden.device.type == "cuda":
        return _chunked(hidden, weight, bias, labels, opts, grad_output)
    compute = _compute_dtype(hidden, weight)
    if grad_output is None:
        loss, dh, dw, db = _core.linear_cross_entropy(hidden, weight, labels, bias=bias, **opts), None, None, None
    else:
        loss, dh, dw, db = _core.linear_cross_entropy_and_grad(hidden, weight, labels, bias=bias, **opts,
                                                               grad_output=grad_output)
    to = (lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)))
    loss = to(loss).to(compute) if opts["reduction"] == "none" else torch.tensor(loss, dtype=compute)
    return loss, to(dh), to(dw), to(db)


def _chunked(hidden, weight, bias, labels, opts, grad_output):
    """The chunk loop of :mod:`ptx_numba.linear` with torch matmuls, on the tensors' device."""
    reduction, backend = opts["reduction"], opts["backend"]
    ignore_index = check_ignore_index(opts["ignore_index"])
    eps, lam, spec = _ce_options(opts["label_smoothing"], opts["z_loss"], opts["softcap"])
    compute = _compute_dtype(hidden, weight)
    vocab, dim = weight.shape
    batch_shape = tuple(hidden.shape[:-1])
    h = hidden.detach().reshape(-1, dim)
    w = weight.detach().to(compute)
    b = None if bias is None else bias.detach().to(compute)
    y = _core._flat_labels(labels, batch_shape, vocab, ignore_index)
    n, valid = h.shape[0], y >= 0
    count = int(np.count_nonzero(valid))
    chunk = opts["chunk_size"]
    if chunk is None:
        chunk = max(1, config.LINEAR_CHUNK_BYTES // max(1, vocab * (8 if compute == torch.float64 else 4)))
    elif isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk!r}")
    want = grad_output is not None
    if want:
        g_all = _core._row_grad_output(reduction, grad_output, batch_shape, valid, count)
        dh = torch.zeros((n, dim), dtype=compute, device=h.device)
        dw = torch.zeros((vocab, dim), dtype=compute, device=h.device)
        db = None if b is None else torch.zeros(vocab, dtype=compute, device=h.device)
    rows_loss = np.zeros(n)
    buf = torch.empty((min(int(chunk), max(n, 1)), vocab), dtype=compute, device=h.device)
    for start in range(0, n, buf.shape[0]):
        rows = slice(start, min(start + buf.shape[0], n))
        hc = h[rows].to(compute)
        logits = buf[: rows.stop - rows.start]
        torch.matmul(hc, w.T, out=logits)
        if b is not None:
            logits += b
        batch = prepare(logits, y[rows], ignore_index=-1)
        st, name = _ops.stats(batch, spec, backend)
        rows_loss[rows] = _finish.cross_entropy(st, batch.valid, vocab, eps, lam)
        if want:  # the chunk's gradient overwrites its logits, then two matmuls
            coef = _finish.ce_coef(st, g_all[rows], vocab, eps, lam)
            _ops.grad(batch, spec, st, coef, _encoded(logits), name)
            torch.matmul(logits, w, out=dh[rows])
            dw.addmm_(logits.T, hc)
            if db is not None:
                db += logits.sum(dim=0)
    if reduction == "none":
        loss = torch.from_numpy(rows_loss.reshape(batch_shape)).to(device=h.device, dtype=compute)
    else:
        loss = torch.tensor(_ops.reduce(rows_loss, count, reduction), dtype=compute, device=h.device)
    if not want:
        return loss, None, None, None
    return loss, dh.reshape(batch_shape + (dim,)), dw, db


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, want_grad):
        ctx.opts, ctx.labels, ctx.grads = opts, labels, None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if want_grad and opts["reduction"] != "none":
            loss, *grads = _run(hidden, weight, bias, labels, opts, 1.0)
            ctx.grads = grads
        else:
            loss = _run(hidden, weight, bias, labels, opts, None)[0]
            if want_grad:
                ctx.save_for_backward(hidden, weight, bias)
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is not None:  # mean/sum: the forward's gradients, scaled by the upstream scalar
            dh, dw, db = (None if a is None else a * g.to(a.dtype) for a in ctx.grads)
        else:  # none: per-row upstream gradients, recomputed chunk by chunk
            hidden, weight, bias = ctx.saved_tensors
            g_rows = g.detach().to("cpu", torch.float64).numpy()
            _, dh, dw, db = _run(hidden, weight, bias, ctx.labels, ctx.opts, g_rows)
        need = ctx.needs_input_grad
        out = [None if (a is None or not need[i]) else a.to(ctx.dtypes[i])
               for i, a in enumerate((dh, dw, db))]
        return out[0], out[1], out[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: Any, *, bias: torch.Tensor | None = None,
                         ignore_index: int = _IGNORE, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None, chunk_size: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` with autograd to ``hidden``, ``weight``, ``bias``.

    The N x V logits are never held: rows go ``chunk_size`` at a time through one reused buffer.

    Parameters
    ----------
    hidden : torch.Tensor, shape (..., D)
        float32/float64; bfloat16/float16 are multiplied in float32 chunks.
    weight : torch.Tensor, shape (V, D)
        The LM head (``nn.Linear`` layout). ``d_weight`` is accumulated in float32 (float64 for
        float64 inputs) and rounded to the weight's dtype once.
    labels : torch.Tensor or array_like of int, shape hidden.shape[:-1]
    bias : torch.Tensor, shape (V,), optional
    ignore_index, reduction, label_smoothing, z_loss, softcap, backend
        As in :func:`ptx_numba.torch.cross_entropy`.
    chunk_size : int, optional
        Rows per chunk; default: as many as fit ``config.LINEAR_CHUNK_BYTES`` of logits.

    Returns
    -------
    torch.Tensor
        0-d for "mean"/"sum", else shaped like ``labels``; float32 (float64 for float64 inputs).

    Notes
    -----
    With ``"mean"``/``"sum"`` and a gradient needed, the forward computes the gradients too (one
    matmul pass) and keeps them until the backward scales them: memory the size of ``hidden`` and
    ``weight``, in exchange for not recomputing the logits.
    """
    _check(hidden, weight, bias)
    reduction = check_reduction(reduction)
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap, chunk_size=chunk_size, backend=backend)
    want = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, opts, want)
