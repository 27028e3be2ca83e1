"""Per-row write of the statistics (thread 0, float64), with the canonical special values.

The output is one float64 device array ``out[FIELDS, N]``, rows in :data:`FIELDS` order (the
field order of :class:`ptx_numba._rowpass.RowStats`); fields a spec does not ask for are left
unwritten. Special rows (:mod:`ptx_numba._rowpass`): a NaN gives ``m = s = NaN``; else ``+inf``
gives ``m = +inf, s = 1``; else all ``-inf`` gives ``m = -inf, s = 0``; their ``t, d, u`` are NaN.
The label gather reads ``z[y]`` once more and transforms it in float64; it runs for every row with
a label (``y >= 0``), so whether an op wants the target is a matter of its labels, not a compiled
variant (rows without labels read nothing and get NaN).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numba

from . import NAN_W, NAN_Z, NINF_Z, UINF, cuda
from .load import make_convert, make_shift_to_zprime, make_transform64

FIELDS = ("m", "s", "target", "t", "d", "m_w", "s_w", "target_w", "u")


@lru_cache(maxsize=None)
def make_gather64(encoding: str, kind: str):
    """``gather(x, r0, r1, j, inv_t, cap) -> float64 z'_j`` of a 3-D ``x`` (NaN for ``j < 0``)."""
    convert = make_convert(encoding, numba.float64)
    tf = make_transform64(kind)
    NAN = numba.float64(math.nan)

    def gather3(x, r0, r1, j, inv_t, cap):
        if j < 0:
            return NAN
        return tf(convert(x[r0, r1, j]), inv_t, cap)

    return cuda.jit(device=True)(gather3)


@lru_cache(maxsize=None)
def make_set_finish(kind: str):
    """``(m', s, special)`` in float64 of one logit set's reduced ``(m, s)`` and NaN flag."""
    to_zprime = make_shift_to_zprime(kind)
    NAN = numba.float64(math.nan)
    INF = numba.float64(math.inf)

    @cuda.jit(device=True)
    def set_finish(m, s, has_nan, inv_t):
        m64 = numba.float64(m)
        if has_nan:
            return NAN, NAN, True
        if m64 == INF:
            return INF, numba.float64(1.0), True
        if m64 == -INF:
            return -INF, numba.float64(0.0), True
        return to_zprime(m64, inv_t), numba.float64(s), False

    return set_finish


@lru_cache(maxsize=None)
def make_finish(encoding: str, w_encoding: str, kind: str, entropy: bool, dsum: bool, pair: bool):
    """``finish(out, row, x, w, r0, r1, label, state..., inv_t, cap)``: write one row."""
    set_finish = make_set_finish(kind)
    gather = make_gather64(encoding, kind)
    gather_w = make_gather64(w_encoding, kind) if pair else gather
    ENT, DSUM, PAIR = entropy, dsum, pair
    NAN = numba.float64(math.nan)
    INF = numba.float64(math.inf)

    @cuda.jit(device=True)
    def finish(out, row, x, w, r0, r1, label, m, s, t, d, n, mw, sw, u, f, inv_t, cap):
        mz, sz, special = set_finish(m, s, (f & NAN_Z) != 0, inv_t)
        out[0, row] = mz
        out[1, row] = sz
        out[2, row] = gather(x, r0, r1, label, inv_t, cap)
        if ENT:
            out[3, row] = NAN if special else numba.float64(t)
        if DSUM:
            if special:
                out[4, row] = NAN
            elif (f & NINF_Z) != 0:
                out[4, row] = -INF
            else:
                out[4, row] = numba.float64(d)
        if PAIR:
            mwz, swz, special_w = set_finish(mw, sw, (f & NAN_W) != 0, inv_t)
            out[5, row] = mwz
            out[6, row] = swz
            out[7, row] = gather_w(w, r0, r1, label, inv_t, cap)
            if special or special_w:
                out[8, row] = NAN
            elif (f & UINF) != 0:
                out[8, row] = INF
            else:
                out[8, row] = numba.float64(u)

    return finish
