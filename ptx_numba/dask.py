"""Dask wrappers: the package's kernels on chunked (possibly distributed) arrays, lazily.

``import ptx_numba.dask as pnd`` needs the ``dask`` extra (``dask[array]``, and ``distributed`` for a
cluster); the core package never imports Dask. Every function takes Dask (or NumPy) arrays and
returns lazy Dask objects; nothing runs until ``.compute()`` / ``dask.compute(...)``, on whichever
scheduler is active (threads, processes, a ``distributed`` cluster).

How it runs (see docs/scale-out.md):

* The arrays are chunked along rows only: the vocabulary (or hidden) axis is rechunked into one
  chunk, because a row's softmax needs all of it, and labels are rechunked to the logits' row chunks.
* Each block runs the package's own kernel (``blockwise``); a reduction returns the block's partial
  ``(sum, count)`` in float64, and the partials are added by Dask's tree reduction (``split_every``
  at a time). The mean is ``sum / count``, and 0 when no row is valid, exactly as in the core, so a
  result equals the single-process one up to the float64 rounding of the combine.
* Each worker process loads the compiled kernels from Numba's disk cache the first time a task
  calls them; later tasks in that process reuse them (no compilation per task).
"""
from __future__ import annotations

import math
import string

import dask
import dask.array as da
import numpy as np

import ptx_numba as _pn

__all__ = ["cross_entropy", "kl_penalty", "linear_cross_entropy", "ptx_loss", "token_logprobs"]

#: Partials added per node of the reduction tree.
SPLIT_EVERY = 16
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# arrays and chunks
# --------------------------------------------------------------------------------------------
def _as_dask(x, what: str) -> da.Array:
    if x is None:
        raise TypeError(f"{what} is None; expected an array")
    if isinstance(x, da.Array):
        return x
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{what} holds non-numbers (dtype object)")
    return da.from_array(arr, chunks=arr.shape or ())  # one chunk: rechunk it yourself to split it


def _rows_only(x: da.Array, what: str) -> da.Array:
    """``x`` with its last axis in one chunk (a row needs its whole vocabulary / hidden vector)."""
    if x.ndim < 2:
        raise ValueError(f"{what} must have shape [..., V] with at least 2 dimensions, got {x.shape}")
    if len(x.chunks[-1]) > 1:
        x = x.rechunk({x.ndim - 1: -1})
    return x


def _like_rows(y, x: da.Array, what: str, shape: tuple | None = None) -> da.Array:
    """``y`` (shaped like ``x.shape[:-1]``) chunked like the rows of ``x``."""
    y = _as_dask(y, what)
    want = x.shape[:-1] if shape is None else shape
    if y.shape != want:
        raise ValueError(f"{what} shape {y.shape} does not match: expected {want}")
    target = x.chunks[:-1] if shape is None else x.chunks
    return y if y.chunks == target else y.rechunk(target)


def _indices(batch_ndim: int) -> str:
    return string.ascii_lowercase[:batch_ndim]


def _out_dtype(*dtypes) -> np.dtype:
    """float64 when any input is float64, else float32 (as the core's per-row outputs)."""
    return np.dtype(np.float64 if any(np.dtype(d) == np.float64 for d in dtypes) else np.float32)


def _check_reduction(reduction) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_finite(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if isinstance(value, (bool, np.bool_)) or not math.isfinite(out):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return out


def _require(name: str):
    fn = getattr(_pn, name, None)
    if fn is None:
        raise NotImplementedError(f"ptx_numba.dask.{name} needs ptx_numba.{name}, which this version "
                                  "of ptx_numba does not have")
    return fn


# --------------------------------------------------------------------------------------------
# per-block functions (run on the workers)
# --------------------------------------------------------------------------------------------
def _partial(total, labels: np.ndarray, ignore_index: int) -> np.ndarray:
    count = np.count_nonzero(labels != ignore_index)
    return np.array([total, count], dtype=np.float64).reshape((1,) * labels.ndim + (2,))


def _ce_block(x, y, ignore_index, backend):
    return _partial(_pn.cross_entropy(x, y, ignore_index=ignore_index, reduction="sum", backend=backend),
                    y, ignore_index)


def _ce_rows_block(x, y, ignore_index, backend, dtype):
    out = _pn.cross_entropy(x, y, ignore_index=ignore_index, reduction="none", backend=backend)
    return np.asarray(out, dtype=dtype)


def _lce_block(h, w, y, b, kwargs, reduction, dtype):
    fn = _require("linear_cross_entropy")
    if reduction == "none":
        return np.asarray(fn(h, w, y, bias=b, reduction="none", **kwargs), dtype=dtype)
    return _partial(fn(h, w, y, bias=b, reduction="sum", **kwargs), y, kwargs["ignore_index"])


def _finish(totals: np.ndarray, reduction: str) -> np.float64:
    total, count = float(totals[0]), float(totals[1])
    if reduction == "sum":
        return np.float64(total)
    return np.float64(total / count if count else 0.0)  # the core's convention: no valid row -> 0


def _finish_ptx(totals: np.ndarray, rl_loss: float, beta: float):
    ce = float(_finish(totals, "mean"))
    return _pn.PTXLoss(rl_loss + beta * ce, beta * ce, ce)


def _reduce(partials: da.Array, batch_ndim: int, reduction: str, split_every: int = SPLIT_EVERY) -> da.Array:
    """Tree-add the ``[..., 2]`` partials and finish the mean/sum as a 0-d Dask array."""
    totals = partials.sum(axis=tuple(range(batch_ndim)), split_every=split_every)
    return da.blockwise(_finish, "", totals, "k", reduction=reduction, dtype=np.float64,
                        concatenate=True, meta=np.empty((), np.float64))


def _partials(fn, batch: str, args: list, **kwargs) -> da.Array:
    adjust = {i: 1 for i in batch}
    return da.blockwise(fn, batch + "z", *args, new_axes={"z": 2}, adjust_chunks=adjust, concatenate=True,
                        dtype=np.float64, meta=np.empty((0,) * (len(batch) + 1), np.float64), **kwargs)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def cross_entropy(logits, labels, *, ignore_index: int = -100, reduction: str = "mean",
                  backend: str = "auto", split_every: int | None = None):
    """Lazy :func:`ptx_numba.cross_entropy` of Dask arrays.

    Parameters
    ----------
    logits : dask.array.Array or array_like, shape (..., V)
        Chunked along rows; the last axis is rechunked into one chunk if it is split.
    labels : dask.array.Array or array_like of int, shape logits.shape[:-1]
        Rechunked to the row chunks of ``logits``.
    ignore_index : int, default -100
    reduction : {"mean", "sum", "none"}
    backend : str
        Passed to the kernel on each worker.
    split_every : int, optional
        Partials added per node of the tree reduction (default ``SPLIT_EVERY``).

    Returns
    -------
    dask.array.Array
        0-d (float64) for "mean"/"sum"; shaped like ``labels`` for "none" (float64 for float64
        logits, else float32; ignored rows 0). The mean of data without any valid row is 0.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> x = da.from_array(np.zeros((6, 4), np.float32), chunks=(2, 4))
    >>> round(float(cross_entropy(x, np.zeros(6, int)).compute()), 6)  # log 4
    1.386294
    """
    reduction = _check_reduction(reduction)
    x = _rows_only(_as_dask(logits, "logits"), "logits")
    y = _like_rows(labels, x, "labels")
    batch = _indices(y.ndim)
    if reduction == "none":
        dtype = _out_dtype(x.dtype)
        return da.blockwise(_ce_rows_block, batch, x, batch + "v", y, batch, ignore_index, None, backend, None,
                            dtype, None, dtype=dtype, concatenate=True, meta=np.empty((0,) * y.ndim, dtype))
    parts = _partials(_ce_block, batch, [x, batch + "v", y, batch, ignore_index, None, backend, None])
    return _reduce(parts, y.ndim, reduction, split_every or SPLIT_EVERY)


def ptx_loss(rl_loss, logits, labels, beta, *, ignore_index: int = -100, backend: str = "auto"):
    """Lazy :func:`ptx_numba.ptx_loss`: ``total = rl_loss + beta * mean CE`` over Dask arrays.

    Parameters
    ----------
    rl_loss, beta : float
        Finite numbers.
    logits, labels, ignore_index, backend
        As in :func:`cross_entropy`.

    Returns
    -------
    dask.delayed.Delayed
        ``.compute()`` (or ``dask.compute``) gives a :class:`ptx_numba.PTXLoss` ``(total, ptx, ce)``.
    """
    rl, b = _check_finite(rl_loss, "rl_loss"), _check_finite(beta, "beta")
    x = _rows_only(_as_dask(logits, "logits"), "logits")
    y = _like_rows(labels, x, "labels")
    batch = _indices(y.ndim)
    parts = _partials(_ce_block, batch, [x, batch + "v", y, batch, ignore_index, None, backend, None])
    totals = parts.sum(axis=tuple(range(y.ndim)), split_every=SPLIT_EVERY)
    return dask.delayed(_finish_ptx, pure=True)(totals, rl, b)


def _tlp_block(x, t, kwargs, entropy, dtype):
    out = _require("token_logprobs")(x, t, return_entropy=entropy, **kwargs)
    if entropy:
        return np.stack([np.asarray(out[0], dtype), np.asarray(out[1], dtype)], axis=-1)
    return np.asarray(out, dtype)


def token_logprobs(logits, tokens, *, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False, backend: str = "auto"):
    """Lazy :func:`ptx_numba.token_logprobs`, block by block.

    Parameters
    ----------
    logits : dask.array.Array or array_like, shape (..., V)
    tokens : dask.array.Array or array_like of int, shape logits.shape[:-1]
    temperature, ignore_index, return_entropy, backend
        As in :func:`ptx_numba.token_logprobs`.

    Returns
    -------
    dask.array.Array or tuple of two
        Log-probs shaped like ``tokens`` (and the entropies with ``return_entropy``), float64 for
        float64 logits, else float32; ignored positions 0.
    """
    _require("token_logprobs")
    x = _rows_only(_as_dask(logits, "logits"), "logits")
    t = _like_rows(tokens, x, "tokens")
    batch = _indices(t.ndim)
    dtype = _out_dtype(x.dtype)
    kwargs = {"temperature": temperature, "ignore_index": ignore_index, "backend": backend}
    if not return_entropy:
        return da.blockwise(_tlp_block, batch, x, batch + "v", t, batch, kwargs, None, False, None,
                            dtype, None, dtype=dtype, concatenate=True, meta=np.empty((0,) * t.ndim, dtype))
    both = da.blockwise(_tlp_block, batch + "z", x, batch + "v", t, batch, kwargs, None, True, None,
                        dtype, None, new_axes={"z": 2}, dtype=dtype, concatenate=True,
                        meta=np.empty((0,) * (t.ndim + 1), dtype))
    return both[..., 0], both[..., 1]


def _klp_block(x, r, t, kwargs, dtype):
    return np.asarray(_require("kl_penalty")(x, r, t, **kwargs), dtype)


def kl_penalty(logits, ref_logits, tokens, *, estimator: str = "k1", temperature: float = 1.0,
               ignore_index: int = -100, backend: str = "auto"):
    """Lazy :func:`ptx_numba.kl_penalty` (per-token KL estimate against a reference policy).

    Parameters
    ----------
    logits, ref_logits : dask.array.Array or array_like, shape (..., V)
        Same shape; ``ref_logits`` is rechunked to the chunks of ``logits``.
    tokens : dask.array.Array or array_like of int, shape logits.shape[:-1]
    estimator, temperature, ignore_index, backend
        As in :func:`ptx_numba.kl_penalty`.

    Returns
    -------
    dask.array.Array
        Shaped like ``tokens``; float64 if either logit set is float64, else float32.
    """
    _require("kl_penalty")
    x = _rows_only(_as_dask(logits, "logits"), "logits")
    r = _like_rows(ref_logits, x, "ref_logits", shape=x.shape)
    t = _like_rows(tokens, x, "tokens")
    batch = _indices(t.ndim)
    dtype = _out_dtype(x.dtype, r.dtype)
    kwargs = {"estimator": estimator, "temperature": temperature, "ignore_index": ignore_index,
              "backend": backend}
    return da.blockwise(_klp_block, batch, x, batch + "v", r, batch + "v", t, batch, kwargs, None, dtype,
                        None, dtype=dtype, concatenate=True, meta=np.empty((0,) * t.ndim, dtype))


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, chunk_size: int | None = None, backend: str = "auto"):
    """Lazy :func:`ptx_numba.linear_cross_entropy` from hidden states chunked by rows.

    Parameters
    ----------
    hidden : dask.array.Array or array_like, shape (..., D)
        Chunked along rows (``D`` is rechunked into one chunk).
    weight : array_like, shape (V, D)
        One chunk, a single key of the graph: a distributed cluster ships it once to each worker.
    labels : dask.array.Array or array_like of int, shape hidden.shape[:-1]
    bias : array_like, shape (V,), optional
    ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, backend
        As in :func:`ptx_numba.linear_cross_entropy` (``chunk_size`` applies inside each block).

    Returns
    -------
    dask.array.Array
        0-d float64 for "mean"/"sum" (mean over valid rows, 0 without any); shaped like ``labels``
        for "none".
    """
    _require("linear_cross_entropy")
    reduction = _check_reduction(reduction)
    h = _rows_only(_as_dask(hidden, "hidden"), "hidden")
    w = _as_dask(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must have shape [V, D], got {w.shape}")
    w = w.rechunk(w.shape)
    y = _like_rows(labels, h, "labels")
    batch = _indices(y.ndim)
    kwargs = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss,
              "softcap": softcap, "chunk_size": chunk_size, "backend": backend}
    b_args = [None, None]
    if bias is not None:
        b = _as_dask(bias, "bias")
        b_args = [b.rechunk(b.shape), "w"]
    dtype = _out_dtype(h.dtype)
    args = [h, batch + "d", w, "wd", y, batch, *b_args, kwargs, None, reduction, None, dtype, None]
    if reduction == "none":
        return da.blockwise(_lce_block, batch, *args, dtype=dtype, concatenate=True,
                            meta=np.empty((0,) * y.ndim, dtype))
    return _reduce(_partials(_lce_block, batch, args), y.ndim, reduction)
