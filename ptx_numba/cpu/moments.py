"""The moments walk: every :class:`StatsSpec` beyond the plain one (temperature, softcap, entropy
moment ``t``, ``dsum`` ``d``, and the pair moments ``m_w, s_w, u`` of a second logit set).

Same walk as :mod:`.rowpass` (pieces, L1 chunks, first-entry shift, rescan past the trigger),
but each chunk gathers all the moments in one read, in loops LLVM vectorizes (:func:`fast_exp`,
float32 lanes for float32-computed encodings; float64 with a softcap or float64 logits), added
per chunk into float64 piece accumulators. When a shift moves from ``m`` to ``m'`` (``delta =
m' - m``) the accumulators are moved with it exactly as the protocol defines them::

    s' = e^-delta s      t' = e^-delta (t - delta s)      d' = d - n_seen delta
    u' = e^-delta (u - delta s)   (z's shift),   u' = u + delta_w s   (w's shift)

Shifts live in the *stored* domain without a softcap: ``rel_j = (z_j - m) * inv_temperature``
in float32, so ``z * inv_temperature`` is never rounded at a large offset (at ±3e4 that alone
would cost 2e-3 absolute); the reported shift is ``m * inv_temperature`` in float64. With a
softcap ``c`` the transformed ``z' = c tanh(z inv_temperature / c)`` is bounded and computed in
float64, and the shift lives in the transformed domain.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from ._jit import CHUNK, jit, piece_bounds
from ._jit import MOMENT_TRIGGER as TRIGGER
from .simd.primitives import _EXP_FLAGS, decode, fast_exp, neg_inf_like, zero_like


# --------------------------------------------------------------------------------------------
# the transform, by the type of ``cap`` (None: temperature only; float64: softcap)
# --------------------------------------------------------------------------------------------
def tvalue(v, cap, ratio):
    """The value a stored element ``v`` has in the shift's domain (Numba-only)."""
    raise NotImplementedError("tvalue is a Numba-only function")


def kscale(v, cap, inv_t):
    """The factor from shift-domain differences to ``z'`` differences (Numba-only)."""
    raise NotImplementedError("kscale is a Numba-only function")


def tanh64(a):
    """Vectorizable float64 ``tanh`` from :func:`fast_exp` (error ~1e-16 absolute; Numba-only)."""
    raise NotImplementedError("tanh64 is a Numba-only function")


@overload(tanh64, jit_options={"fastmath": _EXP_FLAGS, "cache": True})
def _tanh64_overload(a):
    def impl(a):
        e = fast_exp(-2.0 * abs(a))  # in (0, 1]: no overflow; -inf/inf inputs give e = 0
        return math.copysign((1.0 - e) / (1.0 + e), a)
    return impl


@overload(tvalue, jit_options={"fastmath": _EXP_FLAGS, "cache": True})
def _tvalue_overload(v, cap, ratio):
    if isinstance(cap, types.NoneType):
        return lambda v, cap, ratio: decode(v)
    return lambda v, cap, ratio: cap * tanh64(np.float64(decode(v)) * ratio)


@overload(kscale, jit_options={"cache": True})
def _kscale_overload(v, cap, inv_t):
    if isinstance(cap, types.NoneType):
        if v == types.float64:
            return lambda v, cap, inv_t: inv_t
        return lambda v, cap, inv_t: np.float32(inv_t)
    return lambda v, cap, inv_t: 1.0


def _no_cap(cap):
    raise NotImplementedError


@overload(_no_cap, jit_options={"cache": True})
def __no_cap_overload(cap):
    flag = isinstance(cap, types.NoneType)
    return lambda cap: flag


def _ratio(cap, inv_t):
    raise NotImplementedError


@overload(_ratio, jit_options={"cache": True})
def _ratio_overload(cap, inv_t):
    if isinstance(cap, types.NoneType):
        return lambda cap, inv_t: 0.0
    return lambda cap, inv_t: inv_t / cap


# --------------------------------------------------------------------------------------------
# chunk partials
# --------------------------------------------------------------------------------------------
@jit()
def tmax(chunk, cap, ratio):
    """Exact max of the chunk's shift-domain values; NaN if it holds a NaN (see rowpass.chunk_max)."""
    best = neg_inf_like(tvalue(chunk[0], cap, ratio))
    poison = zero_like(best)
    for j in range(chunk.size):
        value = tvalue(chunk[j], cap, ratio)
        best = value if value > best else best
        poison = value if value != value else poison
    return poison if poison != poison else best


@jit()
def partials_one(chunk, m, k, cap, ratio):
    """``(sum e, sum e*rel, sum rel)`` with ``rel = (v - m) * k``, ``e = exp(rel)`` (terms with
    ``e = 0`` add nothing to the middle sum: a masked entry has no entropy)."""
    zero = zero_like(tvalue(chunk[0], cap, ratio) * k)
    s = t = d = zero
    for j in range(chunk.size):
        rel = (tvalue(chunk[j], cap, ratio) - m) * k
        e = fast_exp(rel)
        s += e
        t += e * rel if e > zero else zero
        d += rel
    return s, t, d


@jit()
def partials_pair(chunk, wchunk, m, k, mw, kw, cap, ratio):
    """:func:`partials_one` plus ``sum exp(f)`` and ``sum e*(rel - f)``, ``f = (w - mw) * kw``."""
    zero = zero_like(tvalue(chunk[0], cap, ratio) * k)
    zw = zero_like(tvalue(wchunk[0], cap, ratio) * kw)
    s = t = d = u = zero
    sw = zw
    for j in range(chunk.size):
        rel = (tvalue(chunk[j], cap, ratio) - m) * k
        f = (tvalue(wchunk[j], cap, ratio) - mw) * kw
        e = fast_exp(rel)
        s += e
        t += e * rel if e > zero else zero
        d += rel
        sw += fast_exp(f)
        u += e * (rel - f) if e > zero else zero
    return s, t, d, sw, u


def _partials(chunk, wchunk, m, k, mw, kw, cap, ratio):
    raise NotImplementedError


@overload(_partials, jit_options={"cache": True})
def _partials_overload(chunk, wchunk, m, k, mw, kw, cap, ratio):
    if isinstance(wchunk, types.NoneType):
        def one(chunk, wchunk, m, k, mw, kw, cap, ratio):
            s, t, d = partials_one(chunk, m, k, cap, ratio)
            return s, t, d, zero_like(s), zero_like(s)
        return one
    return lambda chunk, wchunk, m, k, mw, kw, cap, ratio: partials_pair(chunk, wchunk, m, k, mw, kw, cap, ratio)


def _slice(w, start, stop):
    raise NotImplementedError


@overload(_slice, jit_options={"cache": True})
def _slice_overload(w, start, stop):
    if isinstance(w, types.NoneType):
        return lambda w, start, stop: None
    return lambda w, start, stop: w[start:stop]


def _first(w, cap, ratio, like):
    raise NotImplementedError


@overload(_first, jit_options={"cache": True})
def _first_overload(w, cap, ratio, like):
    if isinstance(w, types.NoneType):
        return lambda w, cap, ratio, like: like
    return lambda w, cap, ratio, like: tvalue(w[0], cap, ratio)


def _kw(w, v, cap, inv_t):
    raise NotImplementedError


@overload(_kw, jit_options={"cache": True})
def _kw_overload(w, v, cap, inv_t):
    if isinstance(w, types.NoneType):
        return lambda w, v, cap, inv_t: kscale(v, cap, inv_t)
    return lambda w, v, cap, inv_t: kscale(w[0], cap, inv_t)


def _wmax(w, cap, ratio, like):
    raise NotImplementedError


@overload(_wmax, jit_options={"cache": True})
def _wmax_overload(w, cap, ratio, like):
    if isinstance(w, types.NoneType):
        return lambda w, cap, ratio, like: like
    return lambda w, cap, ratio, like: tmax(w, cap, ratio)


# --------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------
@jit()
def moments_walk(piece, wpiece, inv_t, cap):
    """``(m, s, t, d, m_w, s_w, u)`` of one piece (``wpiece`` None: the last three are 0).

    Shifts are reported as ``z'`` values in float64. A NaN poisons the set's shift (so every sum
    of that set, and ``u``, become NaN); ``+inf`` leaves ``m = +inf``; all -inf leaves
    ``m = -inf, s = 0``. The finish re-scans such rows for their canonical values.
    """
    n = piece.size
    ratio = _ratio(cap, inv_t)
    v0 = tvalue(piece[0], cap, ratio)
    w0 = _first(wpiece, cap, ratio, v0)
    k = kscale(piece[0], cap, inv_t)
    kw = _kw(wpiece, piece[0], cap, inv_t)
    ninf, zero = neg_inf_like(v0), zero_like(v0)
    ninfw, zerow = neg_inf_like(w0), zero_like(w0)
    m = v0 if (v0 > ninf and v0 < -ninf) else ninf
    mw = w0 if (w0 > ninfw and w0 < -ninfw) else ninfw
    s = t = d = sw = u = 0.0
    # the float64 scale, not float64(k): shifts are reported (and moved) with the exact
    # temperature; a float32-rounded one would move m by |m| * 6e-8 (2e-3 at offsets of 3e4)
    kk = kkw = inv_t if _no_cap(cap) else 1.0
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        chunk = piece[start:stop]
        wchunk = _slice(wpiece, start, stop)
        # A set whose shift is still -inf (nothing but -inf so far) takes the chunk's max: from
        # -inf there is nothing to rescale (s = t = u = 0; d is -inf or 0 already).
        if m == ninf:
            top = tmax(chunk, cap, ratio)
            if top > m or top != top:
                m = top
        if mw == ninfw:
            topw = _wmax(wchunk, cap, ratio, w0)
            if topw > mw or topw != topw:
                mw = topw
        ms = m if m != ninf else zero  # a -inf shift: terms computed against 0 are all 0
        mws = mw if mw != ninfw else zerow
        ps, pt, pd, psw, pu = _partials(chunk, wchunk, ms, k, mws, kw, cap, ratio)
        if ps > TRIGGER or psw > TRIGGER:
            # values well above a shift: move it to the chunk max, moving the sums with it
            if ps > TRIGGER:
                top = tmax(chunk, cap, ratio)
                if top > m:
                    delta = (np.float64(top) - np.float64(m)) * kk
                    f = math.exp(-delta)
                    t = f * (t - delta * s)
                    u = f * (u - delta * s)
                    s = f * s
                    d = d - (start * delta)
                    m = top
            if psw > TRIGGER:
                topw = _wmax(wchunk, cap, ratio, w0)
                if topw > mw:
                    deltaw = (np.float64(topw) - np.float64(mw)) * kkw
                    u = u + deltaw * s
                    sw = sw * math.exp(-deltaw)
                    mw = topw
            ms = m if m != ninf else zero
            mws = mw if mw != ninfw else zerow
            ps, pt, pd, psw, pu = _partials(chunk, wchunk, ms, k, mws, kw, cap, ratio)
        s += float(ps)
        t += float(pt)
        d += float(pd)
        sw += float(psw)
        u += float(pu)
    return np.float64(m) * kk, s, t, d, np.float64(mw) * kkw, sw, u


@jit(parallel=True)
def moments_kernel(flat, row0, stride, wflat, wrow0, wstride, n_rows, vocab, pieces_per_row,
                   inv_t, cap, acc):
    """Fill ``acc[row, piece, :7]`` with :func:`moments_walk` of every piece of every row."""
    for task in prange(n_rows * pieces_per_row):
        row, piece, start, stop = piece_bounds(task, pieces_per_row, vocab)
        if start >= stop:
            acc[row, piece, 0] = -np.inf
            acc[row, piece, 4] = -np.inf
            continue
        base = row0 + row * stride
        wbase = wrow0 + row * wstride
        r = moments_walk(flat[base + start:base + stop], _slice(wflat, wbase + start, wbase + stop),
                         inv_t, cap)
        for f in range(7):
            acc[row, piece, f] = r[f]
