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
from typing import NamedTuple

import numba

from . import acc_type, cuda
from .load import make_loader, make_scale, make_store


class GradKey(NamedTuple):
    """One compiled configuration of the gradient kernel."""

    encoding: str
    w_encoding: str  #: "" without the E term
    out_encoding: str
    ndim: int
    out_ndim: int
    kind: str
    has_b: bool
    has_e: bool
    tpb: int


_cache: dict[GradKey, object] = {}


def get_grad_kernel(key: GradKey):
    """The kernel for one configuration, built on first request and cached."""
    kernel = _cache.get(key)
    if kernel is None:
        kernel = build_grad_kernel(key)
        _cache[key] = kernel
    return kernel


def make_grad_row(key: GradKey):
    """``grad_row(x, w, out, r0, r1, o0, o1, tid, label, coefs..., shifts..., factors...)``.

    One thread's elements of one row. Built on its own so that tests can compile it alone and
    check that the loop has no float64 arithmetic for the 16/32-bit encodings.
    """
    acc = acc_type(key.encoding)
    load = make_loader(key.encoding, key.ndim, acc)
    load_w = make_loader(key.w_encoding, key.ndim, acc) if key.has_e else load
    store = make_store(key.out_encoding, key.out_ndim)
    sc = make_scale(key.kind)
    SOFTCAP = key.kind == "softcap"
    TEMP = key.kind == "temp"
    HAS_B, HAS_E, TPB, NDIM = key.has_b, key.has_e, key.tpb, key.ndim
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
        vocab = x.shape[NDIM - 1]
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


def build_grad_kernel(key: GradKey):
    """Kernel ``(x, w, inner, out, out_inner, y, st, coef, nrows, inv_t, cap, k, inv_t64)``.

    ``st``: float64 ``[3, N]`` (``m, s, m_w``); ``coef``: float64 ``[5, N]`` (``A..E``, zeros
    for absent ones); ``inner``/``out_inner``: ``T`` of 3-D ``x``/``out`` (1 for 2-D).
    """
    acc = acc_type(key.encoding)
    grad_row, zero_row = make_grad_row(key)
    NDIM = key.ndim
    TEMP = key.kind == "temp"
    INF = numba.float64(math.inf)

    @cuda.jit(device=True)
    def split(m64, s64, inv_t64):
        # (hi, lo, special) of a float64 shift: hi + lo ~ m in the domain, in two floats.
        if not (m64 > -INF and m64 < INF and s64 > 0.0 and s64 < INF):
            return acc(0.0), acc(0.0), True
        mdom = m64 / inv_t64 if TEMP else m64
        hi = acc(mdom)
        return hi, acc(mdom - numba.float64(hi)), False

    @cuda.jit
    def grad_kernel(x, w, inner, out, out_inner, y, st, coef, nrows, inv_t, cap, k, inv_t64):
        tid = cuda.threadIdx.x
        vocab = x.shape[NDIM - 1]
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
