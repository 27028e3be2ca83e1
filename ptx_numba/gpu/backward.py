"""The gradient pass on the GPU: :func:`row_grad` of the protocol in :mod:`ptx_numba._rowpass`."""
from __future__ import annotations

import numpy as np

from .._rowpass import GradCoef, RowStats, StatsSpec
from ._device import (
    as_3d,
    compiled,
    copy_back,
    is_device_array,
    launch,
    launch_config,
    numba_cuda,
    rows_and_inner,
    to_device_block,
)
from .rowpass import device_labels, spec_factors

_OUT_ENCODING = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.float16): "f16",
    np.dtype(np.int16): "f16",
    np.dtype(np.uint16): "bf16",
}


def _coef_matrix(coef: GradCoef, n: int) -> np.ndarray:
    mat = np.zeros((5, n), dtype=np.float64)
    for i, values in enumerate(coef):
        if values is not None:
            mat[i] = np.broadcast_to(np.asarray(values, dtype=np.float64), (n,))
    return mat


def _stats_matrix(stats: RowStats, n: int) -> np.ndarray:
    mat = np.zeros((3, n), dtype=np.float64)
    mat[0] = stats.m
    mat[1] = stats.s
    if stats.m_w is not None:
        mat[2] = stats.m_w
    return mat


def row_grad(x, y: np.ndarray, spec: StatsSpec, stats: RowStats, coef: GradCoef, out, w=None) -> None:
    """Write the gradient of one block into ``out`` (the formula of :mod:`ptx_numba._rowpass`).

    Parameters
    ----------
    x : ndarray or numba device array
        The logits block, as for :func:`ptx_numba.gpu.rowpass.row_stats`.
    y : ndarray, int64 ``[n]``
        Labels, -1 for none.
    spec : StatsSpec
        Its transform applies (temperature, softcap); the moments are not used.
    stats : RowStats
        ``m, s`` (and ``m_w`` with the E term) of this block, float64 ``[n]``.
    coef : GradCoef
        Per-row ``A..E`` (None = 0).
    out : ndarray or numba device array
        ``[n, V]`` (device: 2-D or 3-D, same rows as ``x``) in the gradient's encoding: float32,
        float64, float16 / int16 (float16 bits), uint16 (bfloat16 bits). May alias ``x``. A host
        ``out`` is written by a copy back from the device.
    w : like ``x``, optional
        The second logit set (needed when ``coef.E`` is given).
    """
    cuda = numba_cuda()
    from .kernels.grad import GradKey, get_grad_kernel

    host_out = None if is_device_array(out) else out
    d_x, enc = to_device_block(x)
    if int(np.prod(d_x.shape[:-1])) == 0:
        return
    has_e = coef.E is not None
    if has_e and w is None:
        raise ValueError("coef.E needs the second logit set w")
    d_w, w_enc = to_device_block(w) if has_e else (d_x, "")
    out_enc = _OUT_ENCODING.get(np.dtype(out.dtype))
    if out_enc is None:
        raise TypeError(f"unexpected gradient encoding {out.dtype}")
    if host_out is not None:
        d_out = cuda.device_array(host_out.shape, dtype=np.float16 if out_enc == "f16" else host_out.dtype)
    else:
        d_out = out.view(np.float16) if out.dtype == np.int16 else out
    if d_out.ndim not in (2, 3) or tuple(d_out.shape)[-1] != tuple(d_x.shape)[-1]:
        raise ValueError(f"out has shape {tuple(out.shape)}, x has {tuple(d_x.shape)}")
    d_x, d_w, d_o3 = as_3d(d_x), as_3d(d_w), as_3d(d_out)
    nrows, inner = rows_and_inner(d_x)
    out_rows, out_inner = rows_and_inner(d_o3)
    if out_rows != nrows:
        raise ValueError(f"out has shape {tuple(out.shape)}, x has {tuple(d_x.shape)}")
    if has_e and tuple(d_w.shape) != tuple(d_x.shape):
        raise ValueError(f"w has shape {tuple(d_w.shape)}, x has {tuple(d_x.shape)}")
    tpb, max_blocks, _ = launch_config()
    kind, inv_t, cap, kk = spec_factors(spec)
    key = GradKey(enc, w_enc, out_enc, kind, coef.B is not None, has_e, tpb)
    acc = np.float64 if enc == "f64" else np.float32
    d_y = device_labels(y, nrows)
    d_st = cuda.to_device(_stats_matrix(stats, nrows))
    d_coef = cuda.to_device(_coef_matrix(coef, nrows))
    launch(compiled(get_grad_kernel, key), min(nrows, max_blocks), tpb, d_x, d_w, np.int64(inner), d_o3,
           np.int64(out_inner), d_y, d_st, d_coef, np.int64(nrows), acc(inv_t), acc(cap), acc(kk),
           np.float64(inv_t))
    if host_out is not None:
        copy_back(d_out, host_out)
