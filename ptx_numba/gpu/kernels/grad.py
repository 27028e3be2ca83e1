"""The gradient kernel: one read of each logit (two with a second set), one write per element.

Per element, in the compute type (float32 for 16/32-bit logits, float64 for float64):

.. code-block:: text

    q    = sc((dom(z) - m_hi) - m_lo)            # z' - m, the shift split into two floats
    p    = exp(q) / s
    g    = (p * (A + B*q + E*qw)  if p > 0 else 0) + D + C*[j == y]
    out  = g * dz'/dz                               # inv_t * (1 - tanh**2) with a softcap

The row's float64 shift is split into ``m_hi + m_lo`` so that ``z' - m`` stays exact near the
maximum at ±3e4 offsets. ``g`` is rounded to the output encoding last (16-bit outputs from the
float32 value, round to nearest even), so ``p_y - 1`` survives even when ``p_y`` is within an ulp
of 1. Rows whose five coefficients are all zero are written as zeros without reading ``x``; rows
with special statistics (non-finite ``m``, ``s`` not positive and finite) drop the ``p`` term, as
the float64 reference's ``p > 0`` guard does. Each thread reads an element before it writes it,
so ``out`` may alias ``x``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numba
from numba import types

from . import ELEMENT, acc_type, compiled, cuda
from .load import make_loader, make_scale, make_store


class GradKey(NamedTuple):
    """One compiled configuration of the gradient kernel: its compile-time parameters.

    As for :class:`ptx_numba.gpu.kernels.stats.StatsKey`, the layouts and shapes of ``x``, ``w``
    and ``out`` (3-D ``'A'`` arrays), the coefficient values and the transform factors are runtime
    arguments.
    """

    encoding: str
    w_encoding: str  #: "" without the E term
    out_encoding: str
    kind: str
    has_b: bool
    has_e: bool
    tpb: int


_cache: dict[GradKey, object] = {}


def grad_signature(key: GradKey) -> tuple:
    """The argument types the kernel of ``key`` is compiled for (the only ones it accepts)."""
    acc = acc_type(key.encoding)
    x = types.Array(ELEMENT[key.encoding], 3, "A")
    w = types.Array(ELEMENT[key.w_encoding or key.encoding], 3, "A")
    out = types.Array(ELEMENT[key.out_encoding], 3, "A")
    f2 = types.Array(types.float64, 2, "A")
    return (x, w, types.int64, out, types.int64, types.Array(types.int64, 1, "A"), f2, f2, types.int64,
            acc, acc, acc, types.float64)


def get_grad_kernel(key: GradKey):
    """The kernel for one configuration, compiled on first request (for :func:`grad_signature`)."""
    return compiled(_cache, key, grad_signature, build_grad_kernel)


def make_grad_row(key: GradKey):
    """``grad_row(x, w, out, r0, r1, o0, o1, tid, label, coefs..., shifts..., factors...)``.

    One thread's elements of one row. Built on its own so that tests can compile it alone and
    check that the loop has no float64 arithmetic for the 16/32-bit encodings.
    """
    return _grad_row(key.encoding, key.w_encoding, key.out_encoding, key.kind, key.has_b, key.has_e,
                     key.tpb)


@lru_cache(maxsize=None)
def _grad_row(encoding, w_encoding, out_encoding, kind, has_b, has_e, tpb):
    acc = acc_type(encoding)
    load = make_loader(encoding, acc)
    load_w = make_loader(w_encoding, acc) if has_e else load
    store = make_store(out_encoding)
    sc = make_scale(kind)
    SOFTCAP = kind == "softcap"
    TEMP = kind == "temp"
    HAS_B, HAS_E, TPB = has_b, has_e, tpb
    ZERO = acc(0.0)
    ONE = acc(1.0)

    @cuda.jit(device=True)
    def element(v, cap, k, inv_t):
        # (z' in the domain, dz'/dz)
        if SOFTCAP:
            th = acc(math.tanh(v * k))
            return cap * th, inv_t * (ONE - th * th)
        if TEMP:
            return v, inv_t
        return v, ONE

    @cuda.jit(device=True)
    def grad_row(x, w, out, r0, r1, o0, o1, tid, label, a, b, c, dd, e, m_hi, m_lo, inv_s, special,
                 mw_hi, mw_lo, special_w, inv_t, cap, k):
        vocab = x.shape[2]
        j = tid
        while j < vocab:
            z, dz = element(load(x, r0, r1, j), cap, k, inv_t)
            g = ZERO
            if not special:
                q = sc((z - m_hi) - m_lo, inv_t)
                p = acc(math.exp(q)) * inv_s
                if p > ZERO:
                    inner = a
                    if HAS_B:
                        inner += b * q
                    if HAS_E:
                        if e != ZERO:
                            zw, _ = element(load_w(w, r0, r1, j), cap, k, inv_t)
                            qw = acc(math.nan) if special_w else sc((zw - mw_hi) - mw_lo, inv_t)
                            inner += e * qw
                    g = p * inner
            g += dd
            if j == label:
                g += c
            if SOFTCAP or TEMP:
                g = g * dz
            store(out, o0, o1, j, g)
            j += TPB

    @cuda.jit(device=True)
    def zero_row(out, o0, o1, tid, vocab):
        j = tid
        while j < vocab:
            store(out, o0, o1, j, ZERO)
            j += TPB

    return grad_row, zero_row


@lru_cache(maxsize=None)
def _make_split(acc, temp: bool):
    INF = numba.float64(math.inf)

    @cuda.jit(device=True)
    def split(m64, s64, inv_t64):
        # (hi, lo, special) of a float64 shift: hi + lo ~ m in the domain, in two floats.
        if not (m64 > -INF and m64 < INF and s64 > 0.0 and s64 < INF):
            return acc(0.0), acc(0.0), True
        mdom = m64 / inv_t64 if temp else m64
        hi = acc(mdom)
        return hi, acc(mdom - numba.float64(hi)), False

    return split


def build_grad_kernel(key: GradKey):
    """The Python kernel ``(x, w, inner, out, out_inner, y, st, coef, nrows, inv_t, cap, k, inv_t64)``.

    :func:`get_grad_kernel` compiles it. ``x``, ``w``, ``out``: ``[B, T, V]`` arrays (any strides).

    ``st``: float64 ``[3, N]`` (``m, s, m_w``); ``coef``: float64 ``[5, N]`` (``A..E``, zeros
    for absent ones); ``inner``/``out_inner``: ``T`` of ``x``/``out`` (1 for a
    2-D block viewed as ``[N, 1, V]``).
    """
    acc = acc_type(key.encoding)
    grad_row, zero_row = make_grad_row(key)
    split = _make_split(acc, key.kind == "temp")

    def grad_kernel(x, w, inner, out, out_inner, y, st, coef, nrows, inv_t, cap, k, inv_t64):
        tid = cuda.threadIdx.x
        vocab = x.shape[2]
        row = numba.int64(cuda.blockIdx.x)
        while row < nrows:
            r0 = row // inner
            r1 = row - r0 * inner
            o0 = row // out_inner
            o1 = row - o0 * out_inner
            a64 = coef[0, row]
            b64 = coef[1, row]
            c64 = coef[2, row]
            d64 = coef[3, row]
            e64 = coef[4, row]
            if a64 == 0.0 and b64 == 0.0 and c64 == 0.0 and d64 == 0.0 and e64 == 0.0:
                zero_row(out, o0, o1, tid, vocab)
            else:
                s64 = st[1, row]
                m_hi, m_lo, special = split(st[0, row], s64, inv_t64)
                mw_hi, mw_lo, special_w = split(st[2, row], numba.float64(1.0), inv_t64)
                inv_s = acc(0.0) if special else acc(1.0 / s64)
                grad_row(x, w, out, r0, r1, o0, o1, tid, y[row], acc(a64), acc(b64), acc(c64), acc(d64),
                         acc(e64), m_hi, m_lo, inv_s, special, mw_hi, mw_lo, special_w, inv_t, cap, k)
            row += cuda.gridDim.x

    grad_kernel.grad_row = grad_row  # for the compile tests
    return grad_kernel
