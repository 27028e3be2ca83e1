"""Fused linear cross entropy: the loss (and gradients) of ``hidden @ weight.T + bias`` without
ever holding the N x V logits.

Rows of ``hidden`` are taken ``chunk_size`` at a time: the chunk's logits are formed by a BLAS
matmul (NumPy's) into ONE reused buffer, the row pass reads them there, and for gradients the
gradient pass overwrites the same buffer with ``G = d loss / d logits`` (an in-place backward), so
``d_hidden[rows] = G @ weight`` and ``d_weight += G.T @ hidden[rows]`` follow from two more
matmuls. Peak extra memory: one chunk buffer, O(N) statistics and the gradient outputs.

bfloat16/float16 hidden states and weights are multiplied in float32 chunks; ``d_weight`` and
``d_bias`` are accumulated in float32 (float64 for float64 inputs), never in a 16-bit type.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _finish, _ops, config
from ._validate import _as_numpy, check_ignore_index, check_reduction, decode_to_float64, is_device_array, prepare
from .logprobs import forward as _logprob_forward
from .losses import _ce_options


def _float_matrix(value: Any, what: str) -> tuple[np.ndarray, np.dtype]:
    """A host float array and the compute dtype (float64 only when it is float64)."""
    if is_device_array(value):
        raise TypeError(f"{what} is on the GPU; linear_cross_entropy takes host (NumPy / CPU tensor) "
                        "arrays here — use ptx_numba.torch.linear_cross_entropy for CUDA tensors")
    arr, tag = _as_numpy(value, what)
    if tag is not None:  # torch bf16/fp16 arrive as 16-bit bit patterns
        arr = decode_to_float64(arr).astype(np.float32)
    elif arr.dtype.name == "bfloat16" or (arr.dtype.kind == "f" and arr.dtype.itemsize == 2):
        arr = arr.astype(np.float32)
    elif arr.dtype.kind != "f":
        raise TypeError(f"{what} must be floating point, got dtype {arr.dtype}")
    compute = np.dtype(np.float64) if arr.dtype == np.float64 else np.dtype(np.float32)
    return arr, compute


def _inputs(hidden, weight, bias, labels, chunk_size):
    h, dt_h = _float_matrix(hidden, "hidden")
    w, dt_w = _float_matrix(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [V, D] (the nn.Linear layout), got shape {w.shape}")
    if h.ndim < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"hidden shape {h.shape} does not match weight shape {w.shape}: "
                         f"expected hidden.shape[-1] == weight.shape[1] == {w.shape[1]}")
    compute = np.dtype(np.float64) if dt_h == dt_w == np.float64 else np.dtype(np.float32)
    b = None
    if bias is not None:
        b, _ = _float_matrix(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias shape {b.shape} does not match weight: expected ({w.shape[0]},)")
        b = b.astype(compute, copy=False)
    if labels is None:
        raise TypeError("labels is None; expected an array")
    batch_shape = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    vocab = w.shape[0]
    if chunk_size is None:
        chunk = max(1, config.LINEAR_CHUNK_BYTES // max(1, vocab * compute.itemsize))
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        chunk = int(chunk_size)
    return h2, w.astype(compute, copy=False), b, batch_shape, vocab, compute, min(chunk, max(1, h2.shape[0]))


def _flat_labels(labels, batch_shape, vocab, ignore_index):
    from ._validate import as_host_labels, kernel_labels

    return kernel_labels(as_host_labels(labels, batch_shape, vocab, ignore_index), ignore_index)


def _chunk_logits(h, w, b, rows, buf):
    out = buf[: rows.stop - rows.start]
    np.matmul(h[rows].astype(buf.dtype, copy=False), w.T, out=out)
    if b is not None:
        out += b
    return out


def linear_cross_entropy(hidden: Any, weight: Any, labels: Any, *, bias: Any = None,
                         ignore_index: int = config.DEFAULT_IGNORE_INDEX, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         chunk_size: int | None = None, backend: str = "auto"):
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the N x V logits.

    Parameters
    ----------
    hidden : array_like, shape (..., D)
        Hidden states (float32/float64; bfloat16/float16 are multiplied in float32).
    weight : array_like, shape (V, D)
        The LM head (``nn.Linear`` layout).
    labels : array_like of int, shape hidden.shape[:-1]
    bias : array_like, shape (V,), optional
    ignore_index, reduction, label_smoothing, z_loss, softcap, backend
        As in :func:`ptx_numba.cross_entropy`.
    chunk_size : int, optional
        Rows per chunk; default: as many as fit ``config.LINEAR_CHUNK_BYTES`` of logits.

    Returns
    -------
    float or ndarray
        As :func:`ptx_numba.cross_entropy`.
    """
    loss, *_ = _run(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, chunk_size, backend, grad_output=None)
    return loss


def linear_cross_entropy_and_grad(hidden: Any, weight: Any, labels: Any, *, bias: Any = None,
                                  ignore_index: int = config.DEFAULT_IGNORE_INDEX, reduction: str = "mean",
                                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                                  softcap: float | None = None, chunk_size: int | None = None,
                                  grad_output: Any = 1.0, backend: str = "auto"):
    """:func:`linear_cross_entropy` and its gradients, chunk by chunk in one reused buffer.

    Returns
    -------
    loss : float or ndarray
    d_hidden : ndarray, shape and (float32/float64) dtype of the multiplied hidden states
    d_weight : ndarray, shape (V, D), float32 (float64 for float64 inputs)
    d_bias : ndarray, shape (V,), or None without a bias
    """
    return _run(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                chunk_size, backend, grad_output=grad_output)


def _run(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
         chunk_size, backend, grad_output):
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    eps, lam, spec = _ce_options(label_smoothing, z_loss, softcap)
    h, w, b, batch_shape, vocab, compute, chunk = _inputs(hidden, weight, bias, labels, chunk_size)
    y = _flat_labels(labels, batch_shape, vocab, ignore_index)
    n = h.shape[0]
    valid = y >= 0
    count = int(np.count_nonzero(valid))
    want_grad = grad_output is not None
    if want_grad:
        g_all = _row_grad_output(reduction, grad_output, batch_shape, valid, count)
        d_hidden = np.zeros((n, w.shape[1]), compute)
        d_weight = np.zeros(w.shape, compute)
        d_bias = np.zeros(vocab, compute) if b is not None else None
        slab = None if _blas_gemm(compute) else np.empty((min(vocab, _slab_rows(w.shape[1], compute)),
                                                          w.shape[1]), compute)
    rows_loss = np.zeros(n)
    buf = np.empty((chunk, vocab), compute)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        logits = _chunk_logits(h, w, b, rows, buf)
        batch = prepare(logits, _labels_for(y[rows], ignore_index), ignore_index=ignore_index)
        st, name = _ops.stats(batch, spec, backend)
        rows_loss[rows] = _finish.cross_entropy(st, batch.valid, vocab, eps, lam)
        if want_grad:
            coef = _finish.ce_coef(st, g_all[rows], vocab, eps, lam)
            _ops.grad(batch, spec, st, coef, logits, name)  # G overwrites the chunk's logits
            np.matmul(logits, w, out=d_hidden[rows])
            _add_weight_grad(d_weight, logits, h[rows].astype(compute, copy=False), slab)
            if d_bias is not None:
                d_bias += logits.sum(axis=0)
    if reduction == "none":
        loss = rows_loss.astype(compute if compute == np.float64 else np.float32).reshape(batch_shape)
    else:
        loss = _ops.reduce(rows_loss, count, reduction)
    if not want_grad:
        return (loss,)
    return loss, d_hidden.reshape(batch_shape + (w.shape[1],)), d_weight, d_bias


def _slab_rows(d: int, dtype: np.dtype) -> int:
    """Rows of ``d_weight`` per slab: ``config.LINEAR_SLAB_BYTES`` of them, at least one."""
    return max(1, config.LINEAR_SLAB_BYTES // max(1, d * np.dtype(dtype).itemsize))


def _blas_gemm(dtype: np.dtype):
    """SciPy's BLAS ``?gemm`` for ``dtype`` (accumulates in place: ``C = A B + C``), or None."""
    try:
        from scipy.linalg import blas
    except ImportError:
        return None
    return blas.dgemm if dtype == np.float64 else blas.sgemm


def _add_weight_grad(d_weight: np.ndarray, g: np.ndarray, h: np.ndarray, slab: np.ndarray | None) -> None:
    """``d_weight += g.T @ h`` without a temporary the size of ``d_weight``.

    With SciPy, one BLAS ``gemm`` with ``beta = 1`` accumulates into ``d_weight`` in place (its
    transpose is the Fortran-ordered ``C`` BLAS wants). Without it, a slab of vocabulary rows at a
    time goes through the small reused ``slab`` (``+=`` of the whole product would allocate, and
    page in, a temporary as large as ``d_weight`` for every chunk).
    """
    gemm = _blas_gemm(d_weight.dtype)
    if gemm is not None and d_weight.flags.c_contiguous and g.flags.c_contiguous and h.flags.c_contiguous:
        c = d_weight.T  # [D, V], Fortran-ordered: C = h.T @ g + C is d_weight.T += (g.T @ h).T
        out = gemm(1.0, h.T, g.T, beta=1.0, c=c, trans_b=True, overwrite_c=True)
        if not np.shares_memory(out, d_weight):  # BLAS worked on a copy: take its result
            d_weight[...] = out.T
        return
    if slab is None:
        slab = np.empty((min(d_weight.shape[0], _slab_rows(d_weight.shape[1], d_weight.dtype)),
                         d_weight.shape[1]), d_weight.dtype)
    step = slab.shape[0]
    for v0 in range(0, d_weight.shape[0], step):
        v1 = min(v0 + step, d_weight.shape[0])
        part = slab[: v1 - v0]
        np.matmul(g[:, v0:v1].T, h, out=part)
        d_weight[v0:v1] += part


def _labels_for(y_chunk: np.ndarray, ignore_index: int) -> np.ndarray:
    """Kernel labels (-1 = ignored) back in the caller's convention for the front door."""
    if ignore_index == -1 or not -(2**63) <= ignore_index < 2**63:
        return y_chunk
    return np.where(y_chunk < 0, np.int64(ignore_index), y_chunk)


def _row_grad_output(reduction, grad_output, batch_shape, valid, count):
    if reduction == "none":
        g = np.asarray(grad_output, dtype=np.float64)
        if g.shape != tuple(batch_shape):
            raise ValueError(f"grad_output shape {g.shape} does not match labels shape {tuple(batch_shape)}")
        if not np.isfinite(g).all():
            raise ValueError("grad_output must be finite")
        g = g.reshape(-1)
    else:
        from ._validate import check_finite_scalar

        g = check_finite_scalar(grad_output, "grad_output")
        if reduction == "mean":
            g = g / count if count else 0.0
        g = np.full(valid.shape[0], g)
    return np.where(valid, g, 0.0)


def linear_token_logprobs(hidden: Any, weight: Any, tokens: Any, *, bias: Any = None, temperature: float = 1.0,
                          ignore_index: int = config.DEFAULT_IGNORE_INDEX, return_entropy: bool = False,
                          chunk_size: int | None = None, backend: str = "auto"):
    """``token_logprobs(hidden @ weight.T + bias, tokens, ...)`` without the N x V logits.

    Parameters and results as :func:`ptx_numba.token_logprobs`, with ``hidden``, ``weight``,
    ``bias`` and ``chunk_size`` as in :func:`linear_cross_entropy`.
    """
    ignore_index = check_ignore_index(ignore_index)
    h, w, b, batch_shape, vocab, compute, chunk = _inputs(hidden, weight, bias, tokens, chunk_size)
    y = _flat_labels(tokens, batch_shape, vocab, ignore_index)
    n = h.shape[0]
    logp = np.zeros(n)
    ent = np.zeros(n) if return_entropy else None
    buf = np.empty((chunk, vocab), compute)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        logits = _chunk_logits(h, w, b, rows, buf)
        batch, st, _, _ = _logprob_forward(logits, _labels_for(y[rows], ignore_index), temperature=temperature,
                                           ignore_index=ignore_index, entropy=return_entropy, backend=backend)
        logp[rows] = _finish.token_logprob(st, batch.valid)
        if ent is not None:
            ent[rows] = np.where(batch.valid, _finish.entropy(st), 0.0)
    out_dtype = np.float64 if compute == np.float64 else np.float32
    logp = logp.astype(out_dtype).reshape(batch_shape)
    if ent is None:
        return logp
    return logp, ent.astype(out_dtype).reshape(batch_shape)

