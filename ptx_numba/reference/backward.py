"""The gradient pass in float64 NumPy (the formula of :mod:`ptx_numba._rowpass`).

Rounded once, from float64 to the gradient's dtype (bfloat16 by way of float32 with
round-to-nearest-even at each step).
"""
from __future__ import annotations

import numpy as np

from .._rowpass import GradCoef, RowStats, StatsSpec
from .._validate import encode_from_float64
from .rowpass import row_blocks, transform


def _col(values, rows: slice) -> np.ndarray | float:
    return 0.0 if values is None else np.asarray(values, dtype=np.float64)[rows, None]


def _block_grad(x, y, spec: StatsSpec, stats: RowStats, coef: GradCoef, rows: slice, w) -> np.ndarray:
    z = transform(x, spec)
    m = stats.m[rows, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rel = z - m
        p = np.exp(rel) / stats.s[rows, None]
        inner = _col(coef.A, rows) + _col(coef.B, rows) * np.where(p > 0, rel, 0.0)
        if coef.E is not None:
            v = transform(w, spec)
            inner = inner + _col(coef.E, rows) * np.where(p > 0, v - stats.m_w[rows, None], 0.0)
        g = np.where(p > 0, p * inner, 0.0) + _col(coef.D, rows)
    if coef.C is not None:
        hit = y[rows] >= 0
        idx = np.flatnonzero(hit)
        g[idx, y[rows][idx]] += np.asarray(coef.C, dtype=np.float64)[rows][idx]
    if spec.softcap > 0.0:
        g = g * (1.0 - (z / spec.softcap) ** 2)
    if spec.inv_temperature != 1.0:
        g = g * spec.inv_temperature
    zero = np.ones(g.shape[0], dtype=bool)
    for c in coef:
        if c is not None:
            zero &= np.asarray(c, dtype=np.float64)[rows] == 0.0
    g[zero] = 0.0
    return g


def row_grad(x, y, spec: StatsSpec, stats: RowStats, coef: GradCoef, out: np.ndarray, w=None) -> None:
    """Write the gradient of one block into ``out`` (see :mod:`ptx_numba._rowpass`)."""
    n, vocab = x.shape
    starts = row_blocks(n, vocab)
    for start in starts:
        rows = slice(start, min(start + starts.step, n))
        g = _block_grad(x[rows], y, spec, stats, coef, rows, None if w is None else w[rows])
        out[rows] = encode_from_float64(g, out.dtype)
