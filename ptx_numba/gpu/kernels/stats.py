"""The row-statistics kernel: one block per row, one streaming read of each row.

* **scan** (:func:`make_scan`): the threads of a block stride over a row (stride ``blockDim``),
  four elements per step so that several loads are in flight per thread (the kernel is bound by
  memory bandwidth). Each thread keeps the online state of :mod:`.reduce` in the accumulation type
  (float32 for f32/f16/bf16, float64 for f64; every constant is typed, so no float64 arithmetic
  enters the float32 loop). The shift moves lazily (:data:`LAZY_SHIFT`) and every float32 sum is
  compensated (Kahan): a thread sums up to ``V / blockDim`` terms, and plain float32 sums lose the
  small ones next to a large one (at V = 2**20 and 256 threads, 5.7e-5 relative on a row with one
  dominant entry, against the 2e-5 contract). A group holding a NaN only sets a flag.
* **block reduction** (:func:`.reduce.make_block_reduce`) of the thread states.
* **finish** (:func:`.finish.make_finish`) in thread 0, in float64.
* **grid-stride** over rows with a capped grid; row offsets are int64.

Kernels are built by :func:`get_stats_kernel`, one per :class:`StatsKey`, compiled for the one
signature :func:`stats_signature` (3-D arrays of any layout) and cached, so a key is exactly one
compiled kernel, whatever the shapes and strides of the calls.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numba
from numba import types

from . import ELEMENT, LAZY_SHIFT, NAN_W, NAN_Z, NINF_Z, UINF, acc_type, compiled, cuda
from .finish import make_finish
from .load import make_domain, make_loader, make_scale
from .reduce import make_block_reduce


class StatsKey(NamedTuple):
    """One compiled configuration of the statistics kernel: its compile-time parameters.

    Everything else is a runtime argument of the one kernel a key compiles to: the array layouts
    (every array is typed ``'A'``, any strides; 2-D blocks are viewed as ``[N, 1, V]``), the
    batch shape, the labels (the target is gathered wherever ``y >= 0``), the temperature and the
    softcap value.
    """

    encoding: str
    w_encoding: str  #: the second set's encoding ("" without a pair)
    kind: str  #: transform kind (:data:`ptx_numba.gpu.kernels.TRANSFORMS`)
    entropy: bool
    dsum: bool
    pair: bool
    tpb: int
    use_shuffle: bool
    compensate: bool = True  #: Kahan sums (float32 accumulation only; False for f64 and tests)


_cache: dict[StatsKey, object] = {}


def stats_signature(key: StatsKey) -> tuple:
    """The argument types the kernel of ``key`` is compiled for (the only ones it accepts)."""
    acc = acc_type(key.encoding)
    x = types.Array(ELEMENT[key.encoding], 3, "A")
    w = types.Array(ELEMENT[key.w_encoding or key.encoding], 3, "A")
    return (x, w, types.int64, types.Array(types.int64, 1, "A"), types.Array(types.float64, 2, "A"),
            types.int64, acc, acc, acc, types.float64, types.float64)


def get_stats_kernel(key: StatsKey):
    """The kernel for one configuration, compiled on first request (for :func:`stats_signature`)."""
    return compiled(_cache, key, stats_signature, build_stats_kernel)


@lru_cache(maxsize=None)
def make_kahan(compensate: bool):
    """``add(s, c, x) -> (s, c)``: compensated (Kahan) or plain summation; the sum is ``s - c``."""
    if compensate:

        @cuda.jit(device=True)
        def kahan(s, c, x):
            y = x - c
            t = s + y
            return t, (t - s) - y

        return kahan

    @cuda.jit(device=True)
    def plain(s, c, x):
        return s + x, c

    return plain


def make_scan(key: StatsKey):
    """``scan(x, w, r0, r1, tid, inv_t, cap, k) -> state``: one thread's part of one row.

    A device function of its own (shared by the two reductions), so that the compile tests can
    read its code alone and check that the inner loop has no float64 arithmetic for the 16/32-bit
    encodings.
    """
    return _scan(key.encoding, key.w_encoding, key.kind, key.entropy, key.dsum, key.pair, key.tpb,
                 key.compensate)


@lru_cache(maxsize=None)
def _scan(encoding, w_encoding, kind, entropy, dsum, pair, tpb, compensate):
    acc = acc_type(encoding)
    load = make_loader(encoding, acc)
    load_w = make_loader(w_encoding, acc) if pair else load
    dom = make_domain(kind, acc)
    sc = make_scale(kind)
    add = make_kahan(compensate)
    ENT, DSUM, PAIR, TPB = entropy, dsum, pair, tpb
    ZERO = acc(0.0)
    ONE = acc(1.0)
    NEG_INF = acc(-math.inf)
    POS_INF = acc(math.inf)
    LAZY = acc(LAZY_SHIFT)
    I0 = numba.int32(0)

    @cuda.jit(device=True)
    def max4(a, b, c, d):
        ab = b if b > a else a
        cd = d if d > c else c
        return cd if cd > ab else ab

    @cuda.jit(device=True)
    def shift_z(m, mnew, s, cs, t, ct, d, cd, n, u, cu, inv_t):
        # Move the first set's state to the larger shift mnew (compensations folded in).
        if m > NEG_INF and mnew < POS_INF:
            delta = sc(m - mnew, inv_t)
            a = acc(math.exp(delta))
            s_true = s - cs
            if ENT:
                t = a * ((t - ct) + delta * s_true)
                ct = ZERO
            if DSUM:
                d = (d - cd) + n * delta
                cd = ZERO
            if PAIR:
                u = a * ((u - cu) + delta * s_true)
                cu = ZERO
            s = a * s_true
            cs = ZERO
        return mnew, s, cs, t, ct, d, cd, u, cu

    @cuda.jit(device=True)
    def shift_w(mw, mnew, sw, csw, s, cs, u, cu, inv_t):
        # Move the second set's state to mnew; u moves by (mnew - mw) * s.
        if mw > NEG_INF and mnew < POS_INF:
            dw = sc(mw - mnew, inv_t)
            sw = acc(math.exp(dw)) * (sw - csw)
            csw = ZERO
            u = (u - cu) - dw * (s - cs)
            cu = ZERO
        return mnew, sw, csw, u, cu

    @cuda.jit(device=True)
    def lane(v, m, inv_t, valid):
        # (e, q, d-term, d-count) of one entry against a finite shift m.
        q = sc(v - m, inv_t)
        e = acc(math.exp(q))
        dq = ZERO
        dn = ZERO
        if DSUM and valid and v > NEG_INF:
            dq = q
            dn = ONE
        return e, q, dq, dn

    @cuda.jit(device=True)
    def uterm(e, q, vw, mw, inv_t):
        # (term of u, +inf flag) of one entry; mw finite.
        if e > ZERO:
            if vw > NEG_INF:
                return e * (q - sc(vw - mw, inv_t)), I0
            return ZERO, numba.int32(UINF)
        return ZERO, I0

    @cuda.jit(device=True)
    def scan(x, w, r0, r1, tid, inv_t, cap, k):
        vocab = x.shape[2]
        m = NEG_INF
        s = ZERO
        cs = ZERO
        t = ZERO
        ct = ZERO
        d = ZERO
        cd = ZERO
        n = ZERO
        mw = NEG_INF if PAIR else ZERO
        sw = ZERO
        csw = ZERO
        u = ZERO
        cu = ZERO
        f = I0
        mx = NEG_INF  # the true maximum: the shift moves to it once, at the end
        mxw = NEG_INF
        j = tid
        while j < vocab:
            j1 = j + TPB
            j2 = j1 + TPB
            j3 = j2 + TPB
            ok1 = j1 < vocab
            ok2 = j2 < vocab
            ok3 = j3 < vocab
            v0 = dom(load(x, r0, r1, j), cap, k)
            v1 = dom(load(x, r0, r1, j1), cap, k) if ok1 else NEG_INF
            v2 = dom(load(x, r0, r1, j2), cap, k) if ok2 else NEG_INF
            v3 = dom(load(x, r0, r1, j3), cap, k) if ok3 else NEG_INF
            nan_z = v0 != v0 or v1 != v1 or v2 != v2 or v3 != v3
            w0 = w1 = w2 = w3 = ZERO
            nan_w = False
            if PAIR:
                w0 = dom(load_w(w, r0, r1, j), cap, k)
                w1 = dom(load_w(w, r0, r1, j1), cap, k) if ok1 else NEG_INF
                w2 = dom(load_w(w, r0, r1, j2), cap, k) if ok2 else NEG_INF
                w3 = dom(load_w(w, r0, r1, j3), cap, k) if ok3 else NEG_INF
                nan_w = w0 != w0 or w1 != w1 or w2 != w2 or w3 != w3
                if nan_w:
                    f |= NAN_W
            if nan_z:
                f |= NAN_Z
            else:
                if DSUM:
                    if v0 == NEG_INF or (ok1 and v1 == NEG_INF) or (ok2 and v2 == NEG_INF) or (
                            ok3 and v3 == NEG_INF):
                        f |= NINF_Z
                mloc = max4(v0, v1, v2, v3)
                mx = mloc if mloc > mx else mx
                if mloc > m and (m == NEG_INF or sc(mloc - m, inv_t) > LAZY):
                    m, s, cs, t, ct, d, cd, u, cu = shift_z(m, mloc, s, cs, t, ct, d, cd, n, u, cu, inv_t)
            if PAIR and not nan_w:
                mwloc = max4(w0, w1, w2, w3)
                mxw = mwloc if mwloc > mxw else mxw
                if mwloc > mw and (mw == NEG_INF or sc(mwloc - mw, inv_t) > LAZY):
                    mw, sw, csw, u, cu = shift_w(mw, mwloc, sw, csw, s, cs, u, cu, inv_t)
            live_w = PAIR and not nan_w and mw > NEG_INF and mw < POS_INF
            if not nan_z and m > NEG_INF and m < POS_INF:
                e0, q0, dq0, dn0 = lane(v0, m, inv_t, True)
                e1, q1, dq1, dn1 = lane(v1, m, inv_t, ok1)
                e2, q2, dq2, dn2 = lane(v2, m, inv_t, ok2)
                e3, q3, dq3, dn3 = lane(v3, m, inv_t, ok3)
                s, cs = add(s, cs, (e0 + e1) + (e2 + e3))
                if ENT:
                    t0 = e0 * q0 if e0 > ZERO else ZERO
                    t1 = e1 * q1 if e1 > ZERO else ZERO
                    t2 = e2 * q2 if e2 > ZERO else ZERO
                    t3 = e3 * q3 if e3 > ZERO else ZERO
                    t, ct = add(t, ct, (t0 + t1) + (t2 + t3))
                if DSUM:
                    d, cd = add(d, cd, (dq0 + dq1) + (dq2 + dq3))
                    n += (dn0 + dn1) + (dn2 + dn3)
                if live_w:
                    u0, g0 = uterm(e0, q0, w0, mw, inv_t)
                    u1, g1 = uterm(e1, q1, w1, mw, inv_t)
                    u2, g2 = uterm(e2, q2, w2, mw, inv_t)
                    u3, g3 = uterm(e3, q3, w3, mw, inv_t)
                    f |= (g0 | g1) | (g2 | g3)
                    u, cu = add(u, cu, (u0 + u1) + (u2 + u3))
                elif PAIR and not nan_w and mw == NEG_INF:
                    if e0 > ZERO or e1 > ZERO or e2 > ZERO or e3 > ZERO:
                        f |= UINF  # a live entry whose second logit is -inf
            if live_w:
                ew = (acc(math.exp(sc(w0 - mw, inv_t))) + acc(math.exp(sc(w1 - mw, inv_t)))) + (
                    acc(math.exp(sc(w2 - mw, inv_t))) + acc(math.exp(sc(w3 - mw, inv_t))))
                sw, csw = add(sw, csw, ew)
            j += 4 * TPB
        if mx > m:
            m, s, cs, t, ct, d, cd, u, cu = shift_z(m, mx, s, cs, t, ct, d, cd, n, u, cu, inv_t)
        if PAIR and mxw > mw:
            mw, sw, csw, u, cu = shift_w(mw, mxw, sw, csw, s, cs, u, cu, inv_t)
        return m, s - cs, t - ct, d - cd, n, mw, sw - csw, u - cu, f

    return scan


def build_stats_kernel(key: StatsKey):
    """The Python kernel ``(x, w, inner, y, out, nrows, inv_t, cap, k, inv_t64, cap64)``.

    :func:`get_stats_kernel` compiles it. ``x`` (and ``w``, or ``x`` again without a pair):
    ``[B, T, V]`` (``inner = T``), any strides; ``y``: int64 ``[B*T]``, -1 = no label; ``out``: float64
    ``[len(FIELDS), N]``; ``inv_t, cap, k``: the transform's factors in the accumulation type
    (``k = inv_t / cap``), ``inv_t64, cap64`` the same in float64 for the finish.
    """
    acc = acc_type(key.encoding)
    scan = make_scan(key)
    block_reduce = make_block_reduce(acc, key.tpb, key.use_shuffle, key.kind, key.entropy, key.dsum,
                                     key.pair)
    finish = make_finish(key.encoding, key.w_encoding or key.encoding, key.kind, key.entropy,
                         key.dsum, key.pair)

    def stats_kernel(x, w, inner, y, out, nrows, inv_t, cap, k, inv_t64, cap64):
        tid = cuda.threadIdx.x
        row = numba.int64(cuda.blockIdx.x)  # int64: element offsets exceed 2**31 on big batches
        while row < nrows:
            r0 = row // inner
            r1 = row - r0 * inner
            m, s, t, d, n, mw, sw, u, f = scan(x, w, r0, r1, tid, inv_t, cap, k)
            m, s, t, d, n, mw, sw, u, f = block_reduce(m, s, t, d, n, mw, sw, u, f, inv_t)
            if tid == 0:
                finish(out, row, x, w, r0, r1, y[row], m, s, t, d, n, mw, sw, u, f, inv_t64, cap64)
            row += cuda.gridDim.x

    stats_kernel.scan = scan  # for the compile tests
    return stats_kernel
