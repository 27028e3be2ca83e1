"""Public functions: :func:`ptx_loss`, :func:`cross_entropy`, :func:`logsumexp`.

Each one validates its input once (:mod:`ptx_numba._validate`), picks a backend
(:mod:`ptx_numba._dispatch`) and calls that backend's three row functions:

``logsumexp_rows(x)``, ``cross_entropy_rows(x, labels, ignore_index)`` and
``cross_entropy_sum(x, labels, ignore_index) -> (sum, n_valid)``.

GPU-resident inputs go to the CUDA backend's ``device_*`` functions instead, which return device
arrays for per-row results.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from . import _dispatch, config
from .errors import KernelUnavailable
from ._validate import (
    check_finite_scalar,
    check_ignore_index,
    check_reduction,
    is_device_array,
    prepare_host,
)


class PTXLoss(NamedTuple):
    """Result of :func:`ptx_loss`: Python floats, unrounded.

    ``tuple(round(v, 6) for v in result)`` gives the classic ``(total, ptx, ce)`` tuple.
    """

    total: float  #: ``rl_loss + ptx``
    ptx: float  #: ``beta * ce``
    ce: float  #: mean cross entropy over non-ignored rows (0.0 if there are none)


def _run_host(backend: object, batch_nbytes: int, call: Callable[[Any], Any]) -> Any:
    """Run ``call(backend_module)`` on host input, with auto's quiet fallback to the reference."""
    name = _dispatch.requested_backend(backend)
    if name != "auto":
        return call(_dispatch.explicit(name))
    module = _dispatch.choose_auto(on_device=False, nbytes=batch_nbytes)
    try:
        return call(module)
    except KernelUnavailable as exc:
        return call(_dispatch.fall_back(module.NAME, exc))


def _device_backend(backend: object) -> Any:
    """The CUDA module for GPU-resident input; other explicit backends are refused."""
    name = _dispatch.requested_backend(backend)
    if name not in ("auto", "cuda"):
        raise TypeError(
            f"backend {name!r} needs host (NumPy/CPU) arrays but the input is on the GPU; "
            "use backend='cuda' or 'auto', or copy the input to the host first"
        )
    if name == "cuda":
        return _dispatch.explicit("cuda")
    return _dispatch.choose_auto(on_device=True, nbytes=0)


def _mean(total: float, count: int) -> float:
    # No valid row (empty batch, or every label ignored): 0.0 rather than PyTorch's NaN, so that a
    # batch without pre-training tokens adds nothing to the loss instead of poisoning it.
    return total / count if count else 0.0


def cross_entropy(
    logits: Any,
    labels: Any,
    *,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    reduction: str = "mean",
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
    ignore_index = check_ignore_index(ignore_index)
    if labels is None:  # prepare_host reads None as "no labels" (logsumexp)
        raise TypeError("labels is None; expected an array")
    if is_device_array(logits):
        return _device_backend(backend).device_cross_entropy(logits, labels, ignore_index, reduction)
    batch = prepare_host(logits, labels, ignore_index)
    x, y = batch.logits, batch.labels
    if reduction == "none":
        rows = _run_host(backend, x.nbytes, lambda b: b.cross_entropy_rows(x, y, ignore_index))
        return np.asarray(rows, dtype=batch.out_dtype).reshape(batch.batch_shape)
    total, count = _run_host(backend, x.nbytes, lambda b: b.cross_entropy_sum(x, y, ignore_index))
    return float(total) if reduction == "sum" else _mean(float(total), int(count))


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
    if is_device_array(logits):
        return _device_backend(backend).device_logsumexp(logits)
    batch = prepare_host(logits, None, config.DEFAULT_IGNORE_INDEX)
    x = batch.logits
    rows = _run_host(backend, x.nbytes, lambda b: b.logsumexp_rows(x))
    return np.asarray(rows, dtype=batch.out_dtype).reshape(batch.batch_shape)


def ptx_loss(
    rl_loss: Any,
    logits: Any,
    labels: Any,
    beta: Any,
    *,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    backend: str = "auto",
) -> PTXLoss:
    """RLHF loss with a pre-training (PTX) term: ``total = rl_loss + beta * mean CE``.

    Parameters
    ----------
    rl_loss : float
        The RL objective's loss value (finite).
    logits, labels, ignore_index, backend
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
    ignore_index = check_ignore_index(ignore_index)
    if labels is None:  # prepare_host reads None as "no labels" (logsumexp)
        raise TypeError("labels is None; expected an array")
    if is_device_array(logits):
        total, count = _device_backend(backend).device_cross_entropy_sum(logits, labels, ignore_index)
    else:
        batch = prepare_host(logits, labels, ignore_index)
        x, y = batch.logits, batch.labels
        total, count = _run_host(backend, x.nbytes, lambda m: m.cross_entropy_sum(x, y, ignore_index))
    ce = _mean(float(total), int(count))
    ptx = b * ce
    return PTXLoss(rl + ptx, ptx, ce)
