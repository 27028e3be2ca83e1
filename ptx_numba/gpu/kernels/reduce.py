"""The online row state, its combine, and the block reductions.

A thread's (or a group of threads') view of a row is the state

``(m, s, t, d, n, mw, sw, u, f)``

* ``m``: the shift (a domain value, see :mod:`.load`), ``s = sum exp(sc(z - m))``;
* ``t = sum e * sc(z - m)`` over entries with ``e = exp(sc(z - m)) > 0`` (entropy);
* ``d = sum sc(z - m)`` over the ``n`` finite entries (label smoothing; a -inf entry sets a flag);
* ``mw, sw``: the second logit set's shift and sum; ``u = sum e * (sc(z - m) - sc(w - mw))``;
* ``f``: the flag word (:data:`.NAN_Z`, :data:`.NINF_Z`, :data:`.NAN_W`, :data:`.UINF`).

Only the moments a spec asks for are carried (the others stay constant zeros, which the compiler
removes), so the plain case does the work of ``(m, s)`` alone. Merging two states with shifts
``m_i`` into ``m = max(m_i)`` multiplies each part by ``a_i = exp(sc(m_i - m))`` and moves its
moments to the new shift: ``t -> a (t + sc(m_i - m) s)``, ``d -> d + n sc(m_i - m)``,
``u -> a (u + s (sc(m_i - m) - sc(mw_i - mw)))``. A state with an infinite shift (an all -inf part,
or a +inf entry: a special row, finished by its flags and shift alone) contributes no moments, so
no ``inf - inf`` is ever evaluated (NaN comes from NaN input only, and the simulator stays free of
NumPy warnings).

Block reductions (result valid in thread 0):

* ``shuffle``: ``shfl_down_sync`` butterfly inside each warp, warp results through shared memory,
  then one more warp reduction in warp 0 (the model is Dao-AILab quack's online softmax reduce);
* ``tree``: a shared-memory tree (the simulator has no warp shuffles). It folds the block into at
  most :data:`TREE_SLOTS` slots first, so nine float64 fields fit in static shared memory at
  1024 threads.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numba

from . import cuda

_WARP = 32
_FULL_MASK = 0xFFFFFFFF
#: Shared-memory slots of the tree reduction (per field).
TREE_SLOTS = 128


@lru_cache(maxsize=None)
def make_state_ops(acc, kind: str, entropy: bool, dsum: bool, pair: bool):
    """Device functions ``(factor, combine)`` for one accumulation type and spec."""
    from .load import make_scale

    sc = make_scale(kind)
    ZERO = acc(0.0)
    NEG_INF = acc(-math.inf)
    POS_INF = acc(math.inf)
    ENT, DSUM, PAIR = entropy, dsum, pair

    @cuda.jit(device=True)
    def factor(mi, m, inv_t):
        # (a, delta) moving a part with shift mi to the shift m (m finite): a = exp(delta).
        if mi > NEG_INF:
            delta = sc(mi - m, inv_t)
            return acc(math.exp(delta)), delta
        return ZERO, ZERO  # an all -inf part holds nothing

    @cuda.jit(device=True)
    def combine(m1, s1, t1, d1, n1, mw1, sw1, u1, f1, m2, s2, t2, d2, n2, mw2, sw2, u2, f2, inv_t):
        f = f1 | f2
        m = m2 if m2 > m1 else m1
        s = ZERO
        t = ZERO
        d = ZERO
        u = ZERO
        a1 = ZERO
        a2 = ZERO
        dl1 = ZERO
        dl2 = ZERO
        finite = m > NEG_INF and m < POS_INF
        if finite:
            a1, dl1 = factor(m1, m, inv_t)
            a2, dl2 = factor(m2, m, inv_t)
            s = a1 * s1 + a2 * s2
            if ENT:
                t = a1 * (t1 + dl1 * s1) + a2 * (t2 + dl2 * s2)
            if DSUM:
                d = (d1 + n1 * dl1) + (d2 + n2 * dl2)
        n = n1 + n2
        mw = ZERO
        sw = ZERO
        if PAIR:
            mw = mw2 if mw2 > mw1 else mw1
            if mw > NEG_INF and mw < POS_INF:
                aw1, dw1 = factor(mw1, mw, inv_t)
                aw2, dw2 = factor(mw2, mw, inv_t)
                sw = aw1 * sw1 + aw2 * sw2
                if finite:
                    u = a1 * (u1 + s1 * (dl1 - dw1)) + a2 * (u2 + s2 * (dl2 - dw2))
        return m, s, t, d, n, mw, sw, u, f

    return factor, combine


@lru_cache(maxsize=None)
def make_block_reduce(acc, tpb: int, use_shuffle: bool, kind: str, entropy: bool, dsum: bool, pair: bool):
    """``block_reduce(m, s, t, d, n, mw, sw, u, f, inv_t) -> state`` (valid in thread 0).

    It depends on the accumulation type, not the encoding: f32, f16 and bf16 kernels share it.
    """
    if tpb % _WARP or not _WARP <= tpb <= 1024:
        raise ValueError(f"threads per block must be a multiple of 32 in [32, 1024], got {tpb}")
    _, combine = make_state_ops(acc, kind, entropy, dsum, pair)
    ENT, DSUM, PAIR = entropy, dsum, pair
    NWARPS = tpb // _WARP
    NEG_INF = acc(-math.inf)
    ZERO = acc(0.0)
    # Shared arrays of the fields a spec does not carry shrink to one element.
    ST = TREE_SLOTS if not use_shuffle else _WARP
    SE = ST if ENT else 1
    SD = ST if DSUM else 1
    SP = ST if PAIR else 1

    @cuda.jit(device=True)
    def put(am, as_, at, ad, an, amw, asw, au, af, k, m, s, t, d, n, mw, sw, u, f):
        # A state into slot k of the shared arrays (only the fields the spec carries).
        am[k] = m
        as_[k] = s
        af[k] = f
        if ENT:
            at[k] = t
        if DSUM:
            ad[k] = d
            an[k] = n
        if PAIR:
            amw[k] = mw
            asw[k] = sw
            au[k] = u

    @cuda.jit(device=True)
    def get(am, as_, at, ad, an, amw, asw, au, af, k):
        # The state in slot k (fields the spec does not carry are constant zeros).
        return (am[k], as_[k], at[k] if ENT else ZERO, ad[k] if DSUM else ZERO, an[k] if DSUM else ZERO,
                amw[k] if PAIR else ZERO, asw[k] if PAIR else ZERO, au[k] if PAIR else ZERO, af[k])

    if use_shuffle:

        @cuda.jit(device=True)
        def warp_reduce(m, s, t, d, n, mw, sw, u, f, inv_t):
            offset = _WARP // 2
            while offset > 0:
                m2 = cuda.shfl_down_sync(_FULL_MASK, m, offset)
                s2 = cuda.shfl_down_sync(_FULL_MASK, s, offset)
                t2 = cuda.shfl_down_sync(_FULL_MASK, t, offset) if ENT else ZERO
                d2 = cuda.shfl_down_sync(_FULL_MASK, d, offset) if DSUM else ZERO
                n2 = cuda.shfl_down_sync(_FULL_MASK, n, offset) if DSUM else ZERO
                mw2 = cuda.shfl_down_sync(_FULL_MASK, mw, offset) if PAIR else ZERO
                sw2 = cuda.shfl_down_sync(_FULL_MASK, sw, offset) if PAIR else ZERO
                u2 = cuda.shfl_down_sync(_FULL_MASK, u, offset) if PAIR else ZERO
                f2 = cuda.shfl_down_sync(_FULL_MASK, f, offset)
                m, s, t, d, n, mw, sw, u, f = combine(
                    m, s, t, d, n, mw, sw, u, f, m2, s2, t2, d2, n2, mw2, sw2, u2, f2, inv_t)
                offset //= 2
            return m, s, t, d, n, mw, sw, u, f

        @cuda.jit(device=True)
        def shuffle_reduce(m, s, t, d, n, mw, sw, u, f, inv_t):
            am = cuda.shared.array(_WARP, acc)
            as_ = cuda.shared.array(_WARP, acc)
            at = cuda.shared.array(SE, acc)
            ad = cuda.shared.array(SD, acc)
            an = cuda.shared.array(SD, acc)
            amw = cuda.shared.array(SP, acc)
            asw = cuda.shared.array(SP, acc)
            au = cuda.shared.array(SP, acc)
            af = cuda.shared.array(_WARP, numba.int32)
            tid = cuda.threadIdx.x
            lane = tid % _WARP
            warp = tid // _WARP
            m, s, t, d, n, mw, sw, u, f = warp_reduce(m, s, t, d, n, mw, sw, u, f, inv_t)
            if lane == 0:
                put(am, as_, at, ad, an, amw, asw, au, af, warp, m, s, t, d, n, mw, sw, u, f)
            cuda.syncthreads()
            if warp == 0:  # the whole warp takes this branch, so the full mask is right
                if lane < NWARPS:
                    m, s, t, d, n, mw, sw, u, f = get(am, as_, at, ad, an, amw, asw, au, af, lane)
                else:
                    m, s, t, d, n, sw, u, f = NEG_INF, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, numba.int32(0)
                    mw = NEG_INF if PAIR else ZERO
                m, s, t, d, n, mw, sw, u, f = warp_reduce(m, s, t, d, n, mw, sw, u, f, inv_t)
            cuda.syncthreads()  # the shared arrays are reused by the next row
            return m, s, t, d, n, mw, sw, u, f

        return shuffle_reduce

    SLOTS = min(TREE_SLOTS, tpb)
    HALF = 1 << max(0, (SLOTS - 1).bit_length() - 1)  # half of next_pow2(SLOTS): first stride
    TPB = tpb

    @cuda.jit(device=True)
    def tree_reduce(m, s, t, d, n, mw, sw, u, f, inv_t):
        am = cuda.shared.array(SLOTS, acc)
        as_ = cuda.shared.array(SLOTS, acc)
        at = cuda.shared.array(SE, acc)
        ad = cuda.shared.array(SD, acc)
        an = cuda.shared.array(SD, acc)
        amw = cuda.shared.array(SP, acc)
        asw = cuda.shared.array(SP, acc)
        au = cuda.shared.array(SP, acc)
        af = cuda.shared.array(SLOTS, numba.int32)
        tid = cuda.threadIdx.x
        # Fold threads SLOTS.. into the first SLOTS threads, one slot-width at a time.
        base = SLOTS
        while base < TPB:
            if tid >= base and tid < base + SLOTS:
                put(am, as_, at, ad, an, amw, asw, au, af, tid - base, m, s, t, d, n, mw, sw, u, f)
            cuda.syncthreads()
            if tid < SLOTS and tid + base < TPB:
                m2, s2, t2, d2, n2, mw2, sw2, u2, f2 = get(am, as_, at, ad, an, amw, asw, au, af, tid)
                m, s, t, d, n, mw, sw, u, f = combine(
                    m, s, t, d, n, mw, sw, u, f, m2, s2, t2, d2, n2, mw2, sw2, u2, f2, inv_t)
            cuda.syncthreads()
            base += SLOTS
        if tid < SLOTS:
            put(am, as_, at, ad, an, amw, asw, au, af, tid, m, s, t, d, n, mw, sw, u, f)
        cuda.syncthreads()
        stride = HALF
        while stride > 0:
            if tid < stride and tid + stride < SLOTS:
                m, s, t, d, n, mw, sw, u, f = get(am, as_, at, ad, an, amw, asw, au, af, tid)
                m2, s2, t2, d2, n2, mw2, sw2, u2, f2 = get(am, as_, at, ad, an, amw, asw, au, af,
                                                           tid + stride)
                m, s, t, d, n, mw, sw, u, f = combine(
                    m, s, t, d, n, mw, sw, u, f, m2, s2, t2, d2, n2, mw2, sw2, u2, f2, inv_t)
                put(am, as_, at, ad, an, amw, asw, au, af, tid, m, s, t, d, n, mw, sw, u, f)
            cuda.syncthreads()
            stride //= 2
        res = get(am, as_, at, ad, an, amw, asw, au, af, 0)
        cuda.syncthreads()  # the shared arrays are reused by the next row
        return res

    return tree_reduce
