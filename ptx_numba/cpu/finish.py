"""Per-row finish of the CPU row pass: merge the pieces, gather targets, canonical special rows.

Pieces ``p`` of a row carry ``(m_p, s_p, t_p, d_p, m_w_p, s_w_p, u_p)`` (the layout of ``acc``,
see :data:`N_FIELDS`). With the row shifts ``M = max_p m_p`` (pieces with ``s_p > 0``) and
``delta_p = M - m_p``::

    s = sum e^-delta_p s_p     t = sum e^-delta_p (t_p - delta_p s_p)     d = sum d_p - n_p delta_p
    u = sum e^-delta_p (u_p - delta_p s_p + (M_w - m_w_p) s_p)

A row whose pieces hold a non-finite shift or sum (NaN, ``+inf`` entries), or only -inf, is
re-scanned exactly in float64 for the canonical statistics of :mod:`ptx_numba._rowpass`.
Compiled without fast-math: the order of these float64 operations is the point.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from ._jit import jit
from .simd.primitives import decode

#: Per-piece accumulator fields: m, s, t, d, m_w, s_w, u.
N_FIELDS = 7


def t64(v, inv_t, cap):
    """A stored element's transformed value ``z'`` in float64, exactly (Numba-only)."""
    raise NotImplementedError("t64 is a Numba-only function")


@overload(t64, jit_options={"cache": True})
def _t64_overload(v, inv_t, cap):
    if isinstance(cap, types.NoneType):
        return lambda v, inv_t, cap: np.float64(decode(v)) * inv_t
    return lambda v, inv_t, cap: cap * math.tanh(np.float64(decode(v)) * inv_t / cap)


@jit(strict=True)
def exact_set(row, inv_t, cap):
    """Canonical ``(m, s)`` of a row by two float64 passes (NaN; +inf: s = 1; all -inf: s = 0)."""
    best = -np.inf
    nan = False
    for j in range(row.size):
        value = t64(row[j], inv_t, cap)
        nan |= value != value
        best = value if value > best else best
    if nan:
        return math.nan, math.nan
    if best == np.inf:
        return math.inf, 1.0
    if best == -np.inf:
        return -math.inf, 0.0
    total = 0.0
    for j in range(row.size):
        total += math.exp(t64(row[j], inv_t, cap) - best)
    return best, total


@jit(strict=True)
def merge_shift(acc, row, mi, si):
    """``(M, special)`` of one set of a row: the largest piece shift, and whether to re-scan."""
    top = -np.inf
    special = False
    for p in range(acc.shape[1]):
        m_p, s_p = acc[row, p, mi], acc[row, p, si]
        special |= not math.isfinite(s_p) or m_p != m_p or m_p == np.inf
        if s_p > 0.0 and m_p > top:
            top = m_p
    return top, special or top == -np.inf


def _wset(wflat, wbase, vocab, acc, row, inv_t, cap):
    raise NotImplementedError


@overload(_wset, jit_options={"cache": True})
def _wset_overload(wflat, wbase, vocab, acc, row, inv_t, cap):
    if isinstance(wflat, types.NoneType):
        return lambda wflat, wbase, vocab, acc, row, inv_t, cap: (0.0, 0.0, True)

    def impl(wflat, wbase, vocab, acc, row, inv_t, cap):
        top, special = merge_shift(acc, row, 4, 5)
        if special:
            m, s = exact_set(wflat[wbase:wbase + vocab], inv_t, cap)
            return m, s, True
        s = 0.0
        for p in range(acc.shape[1]):
            if acc[row, p, 5] > 0.0:
                s += acc[row, p, 5] * math.exp(acc[row, p, 4] - top)
        return top, s, False
    return impl


def _gather(wflat, wbase, label, inv_t, cap):
    raise NotImplementedError


@overload(_gather, jit_options={"cache": True})
def _gather_overload(wflat, wbase, label, inv_t, cap):
    if isinstance(wflat, types.NoneType):
        return lambda wflat, wbase, label, inv_t, cap: math.nan
    return lambda wflat, wbase, label, inv_t, cap: (t64(wflat[wbase + label], inv_t, cap)
                                                    if label >= 0 else math.nan)


@jit(parallel=True, strict=True)
def finish_kernel(flat, row0, stride, wflat, wrow0, wstride, y, vocab, inv_t, cap, acc, out):
    """Rows of ``out[9, n]``: m, s, target, t, d, m_w, s_w, target_w, u (see module docstring)."""
    n_rows, pieces = acc.shape[0], acc.shape[1]
    piece_len = (vocab + pieces - 1) // pieces
    for row in prange(n_rows):
        base = row0 + row * stride
        wbase = wrow0 + row * wstride
        top, special = merge_shift(acc, row, 0, 1)
        s = t = d = u = 0.0
        if special:
            m, s = exact_set(flat[base:base + vocab], inv_t, cap)
            t = d = math.nan
        else:
            m = top
            for p in range(pieces):
                n_p = min(piece_len, vocab - p * piece_len)
                delta = m - acc[row, p, 0]
                s_p = acc[row, p, 1]
                if s_p > 0.0:
                    f = math.exp(-delta)
                    s += f * s_p
                    t += f * (acc[row, p, 2] - delta * s_p)
                if n_p > 0:
                    d += acc[row, p, 3] - n_p * delta
        m_w, s_w, special_w = _wset(wflat, wbase, vocab, acc, row, inv_t, cap)
        if special or special_w:
            u = math.nan
        else:
            for p in range(pieces):
                s_p = acc[row, p, 1]
                if s_p > 0.0:
                    delta = m - acc[row, p, 0]
                    u += math.exp(-delta) * (acc[row, p, 6] - delta * s_p + (m_w - acc[row, p, 4]) * s_p)
        label = y[row]
        if label >= vocab:
            label = -1  # labels were range-checked upstream; the guard keeps reads in bounds
        out[0, row], out[1, row], out[3, row], out[4, row] = m, s, t, d
        out[2, row] = t64(flat[base + label], inv_t, cap) if label >= 0 else math.nan
        out[5, row], out[6, row], out[8, row] = m_w, s_w, u
        out[7, row] = _gather(wflat, wbase, label, inv_t, cap)
