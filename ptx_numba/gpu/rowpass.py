"""The row pass on the GPU: :func:`row_stats` of the protocol in :mod:`ptx_numba._rowpass`.

One launch per block of rows: a block of threads per row, a grid capped at
``config.CUDA_MAX_BLOCKS`` that strides over the rows. Kernels are specialised at compile time on
the encoding(s), the transform kind and the moments the spec asks for, so the plain case does the
work of ``(m, s)`` and the label gather alone; the temperature and softcap factors, the labels and
the array shapes and strides are arguments (2-D blocks are read as ``[N, 1, V]`` views), so a new
temperature or layout compiles nothing.
"""
from __future__ import annotations

import numpy as np

from .._rowpass import RowStats, StatsSpec, empty_stats
from ._device import (
    as_3d,
    compiled,
    kernels,
    launch,
    launch_config,
    numba_cuda,
    rows_and_inner,
    to_device_block,
)


def spec_factors(spec: StatsSpec) -> tuple[str, float, float, float]:
    """``(kind, inv_t, cap, k)`` of a spec's transform (``k = inv_t / cap``; 1.0 without a cap)."""
    kind = kernels().transform_kind(spec.inv_temperature, spec.softcap)
    inv_t = float(spec.inv_temperature)
    cap = float(spec.softcap) if spec.softcap > 0.0 else 1.0
    return kind, inv_t, cap, inv_t / cap


def device_labels(y: np.ndarray, nrows: int):
    """int64 labels on the device (``y`` host int64 ``[n]`` or a device array)."""
    cuda = numba_cuda()
    if hasattr(y, "copy_to_host") and not isinstance(y, np.ndarray):
        return y
    y = np.ascontiguousarray(y, dtype=np.int64)
    if y.shape != (nrows,):
        raise ValueError(f"y must have shape ({nrows},), got {y.shape}")
    return cuda.to_device(y)


def stats_on_device(x, y, spec: StatsSpec, w=None, compensate: bool = True):
    """Run the statistics kernel; returns the float64 device array ``out[FIELDS, N]`` (or None).

    ``x``/``w``: host or device blocks (see :mod:`ptx_numba._rowpass`); ``y``: int64 labels,
    -1 = none. ``compensate=False`` (plain float32 sums) exists for tests only.
    """
    from .kernels.finish import FIELDS
    from .kernels.stats import StatsKey, get_stats_kernel

    d_x, enc = to_device_block(x)
    if int(np.prod(d_x.shape[:-1])) == 0:
        return None
    d_x = as_3d(d_x)
    nrows, inner = rows_and_inner(d_x)
    d_w, w_enc = (d_x, "") if w is None else to_device_block(w)
    if w is not None and tuple(d_w.shape)[-1] != tuple(d_x.shape)[-1]:
        raise ValueError(f"w has shape {tuple(d_w.shape)}, x has {tuple(d_x.shape)}")
    d_w = as_3d(d_w)
    if tuple(d_w.shape) != tuple(d_x.shape):
        raise ValueError(f"w has shape {tuple(d_w.shape)}, x has {tuple(d_x.shape)}")
    d_y = device_labels(y, nrows)
    tpb, max_blocks, use_shuffle = launch_config()
    kind, inv_t, cap, kk = spec_factors(spec)
    key = StatsKey(enc, w_enc, kind, bool(spec.entropy), bool(spec.dsum), bool(spec.pair), tpb,
                   use_shuffle, compensate and enc != "f64")
    acc = np.float64 if enc == "f64" else np.float32
    out = numba_cuda().device_array((len(FIELDS), nrows), dtype=np.float64)
    kernel = compiled(get_stats_kernel, key)
    launch(kernel, min(nrows, max_blocks), tpb, d_x, d_w, np.int64(inner), d_y, out,
           np.int64(nrows), acc(inv_t), acc(cap), acc(kk), np.float64(inv_t), np.float64(cap))
    return out


def stats_from_host(host: np.ndarray, spec: StatsSpec) -> RowStats:
    """:class:`RowStats` from the host copy of ``out[FIELDS, N]`` (None where not asked for)."""
    def pick(i, wanted):
        return np.ascontiguousarray(host[i]) if wanted else None

    return RowStats(
        pick(0, True), pick(1, True), pick(2, spec.target), pick(3, spec.entropy), pick(4, spec.dsum),
        pick(5, spec.pair), pick(6, spec.pair), pick(7, spec.pair and spec.target), pick(8, spec.pair),
    )


def row_stats(x, y: np.ndarray, spec: StatsSpec, w=None) -> RowStats:
    """Row statistics of one block on the GPU, as float64 host arrays.

    Parameters
    ----------
    x : ndarray or numba device array
        Host: 2-D ``[n, V]`` with unit stride along V (copied to the device). Device: 2-D or 3-D
        ``[B, T, V]`` with any strides (read in place; rows are ``B * T`` in C order).
    y : ndarray, int64 ``[n]``
        Label per row, -1 for none (the gather gives NaN there).
    spec : StatsSpec
        What to compute (:mod:`ptx_numba._rowpass`).
    w : like ``x``, optional
        The second logit set (``spec.pair``), same shape.

    Returns
    -------
    RowStats
        float64 ``[n]`` arrays; float32 accumulation for 16/32-bit input (compensated, so within
        the 2e-5 contract at any V), float64 for float64 input.
    """
    if spec.pair and w is None:
        raise ValueError("spec.pair needs the second logit set w")
    out = stats_on_device(x, y, spec, w if spec.pair else None)
    if out is None:
        return empty_stats(spec)
    return stats_from_host(out.copy_to_host(), spec)
