"""The CPU gradient pass: the element formula of :mod:`ptx_numba._rowpass` in one parallel pass.

Per row (``prange``), per element, in the compute precision (float32; float64 for float64
logits or with a softcap)::

    rel = z'_j - m,  p = exp(rel) / s
    g   = D + C [j == y] + (p (A + B rel + E (w'_j - m_w))  if p > 0 else 0)
    out = g * dz'/dz

rounded to ``out``'s encoding last (bfloat16 and float16 bits from float32 by round to nearest
even). A row is walked in L1 chunks: the gradient goes into a small buffer first and is then
stored, so ``out`` may alias ``x`` (every element is read before it is written) and both loops
still vectorize (LLVM's run-time overlap check sees two distinct ranges).

Without a softcap the shift is carried in the stored domain as a float32 pair ``mh + ml``
(``rel = ((z - mh) - ml) * inv_temperature``), so a row at an offset of 3e4 keeps ``rel`` to
float32 rounding of ``rel`` itself, not of the offset.

Rows with only ``A``, ``C``, ``D`` terms, no temperature and no softcap (cross entropy, z-loss,
label smoothing) of float32 / bfloat16 / float16 logits with a 32- or 16-bit gradient take the
hand-written loop of :mod:`.simd.gradloop` instead (AVX2 hosts, unless ``config.CPU_AVX2`` is
False): the exp-sum loops' term, ``A/s`` and the shift folded into one factor, one pass straight
into ``out``. The label entry is always formed by the formula above, after the loop.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from .. import config
from .._rowpass import GradCoef, RowStats, StatsSpec
from ._jit import CHUNK, jit
from .moments import _ratio, _slice, kscale, tvalue
from .rowpass import flat_rows
from .simd import avx2 as _avx2
from .simd import isa as _isa
from .simd.gradloop import grad_row
from .simd.primitives import f32_to_bits, fast_exp, zero_like
from .simd.shift import K8, S_LIMIT, shift_constants

_U16 = np.uint32(0xFFFF)
_ROUND = np.uint32(0x7FFF)
_QUIET = np.uint32(0x40)
_SHIFT16 = np.uint32(16)
_ONE = np.uint32(1)


@intrinsic
def _f32_to_f16_bits(typingctx, value):
    """float32 -> IEEE float16 bits, round to nearest even (LLVM ``fptrunc``; vcvtps2ph with F16C)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@jit()
def _bf16_bits(g):
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN."""
    bits = f32_to_bits(g)
    rounded = np.uint32((bits + _ROUND + ((bits >> _SHIFT16) & _ONE)) >> _SHIFT16)
    quiet = np.uint32((bits >> _SHIFT16) | _QUIET)
    return np.uint16(quiet if g != g else rounded)


def encode(g, like):
    """``g`` in the encoding of an element of ``like``'s dtype (Numba-only)."""
    raise NotImplementedError("encode is a Numba-only function")


@overload(encode, jit_options={"cache": True})
def _encode_overload(g, like):
    if like == types.float32:
        return lambda g, like: np.float32(g)
    if like == types.float64:
        return lambda g, like: np.float64(g)
    if like == types.uint16:
        return lambda g, like: _bf16_bits(np.float32(g))
    if like == types.int16:
        return lambda g, like: _f32_to_f16_bits(np.float32(g))
    return None


def dscale(v, cap, inv_t, k):
    """``dz'/dz`` at an element whose shift-domain value is ``v`` (Numba-only)."""
    raise NotImplementedError("dscale is a Numba-only function")


@overload(dscale, jit_options={"cache": True})
def _dscale_overload(v, cap, inv_t, k):
    if isinstance(cap, types.NoneType):
        return lambda v, cap, inv_t, k: k
    return lambda v, cap, inv_t, k: inv_t * (1.0 - (v / cap) * (v / cap))


def split_shift(m, cap, inv_t, like):
    """``(mh, ml)`` in the compute type of ``like`` with ``mh + ml ~ m`` in the shift domain."""
    raise NotImplementedError("split_shift is a Numba-only function")


@overload(split_shift, jit_options={"cache": True})
def _split_shift_overload(m, cap, inv_t, like):
    if isinstance(cap, types.NoneType):
        def impl(m, cap, inv_t, like):
            raw = m / inv_t if m == m and abs(m) < np.inf else m
            hi = _cast(raw, like)
            lo = _cast(raw - np.float64(hi), like) if hi == hi and abs(hi) < np.inf else zero_like(like)
            return hi, lo
        return impl
    return lambda m, cap, inv_t, like: (m, 0.0)


def _cast(value, like):
    raise NotImplementedError


@overload(_cast, jit_options={"cache": True})
def _cast_overload(value, like):
    if like == types.float64:
        return lambda value, like: np.float64(value)
    return lambda value, like: np.float32(value)


def _buffer(n, like):
    raise NotImplementedError


@overload(_buffer, jit_options={"cache": True})
def _buffer_overload(n, like):
    if like == types.float64:
        return lambda n, like: np.empty(n, dtype=np.float64)
    return lambda n, like: np.empty(n, dtype=np.float32)


def _rel(v, mh, ml, k):
    """``((v - mh) - ml) * k`` in exactly that order (Numba-only)."""
    raise NotImplementedError


# No "reassoc" here: with it LLVM rewrites (v - mh) - ml as v - (mh + ml), hoists mh + ml out of
# the loop and rounds it to mh in float32, dropping the low part (a 1e-3 error in rel at a 3e4
# offset; tests/test_cpu_backward.py::test_shift_off_the_float32_grid_keeps_its_low_part).
@overload(_rel, jit_options={"fastmath": {"contract"}, "cache": True})
def _rel_overload(v, mh, ml, k):
    return lambda v, mh, ml, k: ((v - mh) - ml) * k


def _inner(a, b, e, rel, wchunk, j, wh, wl, kw, cap, ratio):
    """``A + B rel (+ E (w'_j - m_w))`` in the compute type of ``rel`` (Numba-only)."""
    raise NotImplementedError


@overload(_inner, jit_options={"fastmath": {"nsz", "arcp", "contract", "afn", "reassoc"}, "cache": True})
def _inner_overload(a, b, e, rel, wchunk, j, wh, wl, kw, cap, ratio):
    if isinstance(wchunk, types.NoneType):
        # No E term at all: an ``e * 0.0`` with a float64 literal promoted the whole float32
        # element formula to float64 lanes (half the SIMD width, converts both ways; seen in
        # inspect_asm), and without "nnan" LLVM may not fold the multiply away.
        return lambda a, b, e, rel, wchunk, j, wh, wl, kw, cap, ratio: a + b * rel
    return lambda a, b, e, rel, wchunk, j, wh, wl, kw, cap, ratio: (
        a + b * rel + e * (_rel(tvalue(wchunk[j], cap, ratio), wh, wl, kw)))


def _wfirst(w, like):
    raise NotImplementedError


@overload(_wfirst, jit_options={"cache": True})
def _wfirst_overload(w, like):
    if isinstance(w, types.NoneType):
        return lambda w, like: like
    return lambda w, like: w[0]


# strict: with "reassoc", LLVM may fold ((v - mh) - ml) into v - (mh + ml), and mh + ml rounds
# back to the float32 shift: 1.3e-4 absolute gradient error at offsets of 3e4 (conformance test).
@jit(strict=True)
def _chunk_grad(chunk, wchunk, buf, mh, ml, k, wh, wl, kw, inv_s, a, b, d, e, cap, inv_t, ratio):
    """``buf[:n] = g * dz'/dz`` for one chunk (no label term)."""
    zero = zero_like(buf[0])
    for j in range(chunk.size):
        v = tvalue(chunk[j], cap, ratio)
        rel = _rel(v, mh, ml, k)
        p = fast_exp(rel) * inv_s
        inner = _inner(a, b, e, rel, wchunk, j, wh, wl, kw, cap, ratio)
        g = d + (p * inner if p > zero else zero)
        buf[j] = g * dscale(v, cap, inv_t, k)


def _fast_row(x, out, m, s, a, d, wrow, cap, k):
    """Write the row by :func:`.simd.gradloop.grad_row` when it applies; False if not (Numba-only)."""
    raise NotImplementedError


_FAST_IN = {types.float32: np.float32, types.uint16: np.uint16, types.int16: np.int16}


@overload(_fast_row, jit_options={"cache": True})
def _fast_row_overload(x, out, m, s, a, d, wrow, cap, k):
    usable = (isinstance(wrow, types.NoneType) and isinstance(cap, types.NoneType)
              and x.dtype in _FAST_IN and out.dtype in _FAST_IN and _avx2.supports(np.dtype(_FAST_IN[x.dtype])))
    if not usable:
        return lambda x, out, m, s, a, d, wrow, cap, k: False
    limit = (S_LIMIT - 16.0) / float(K8)

    def impl(x, out, m, s, a, d, wrow, cap, k):
        # no temperature, a finite shift in the loop's range, a positive finite sum
        if not (k == np.float32(1.0) and abs(m) < limit and s > 0.0 and s < np.inf):
            return False
        used, ms, lo, hi, corr = shift_constants(m)
        # p_j = exp(x_j - m) / s = term_j * corr * exp(used - m) / s, term_j from the loop
        fa = np.float32(a * (corr * math.exp(used - m) / s))
        if not abs(fa) < np.inf:
            return False
        grad_row(x, out, K8, ms, lo, hi, fa, np.float32(d))
        return True
    return impl


@jit(parallel=True)
def grad_kernel(flat, row0, stride, wflat, wrow0, wstride, oflat, orow0, ostride, y, vocab,
                inv_t, cap, m, s, m_w, coef, simd):
    """Write every row's gradient (see the module docstring)."""
    n_rows = m.size
    ratio = _ratio(cap, inv_t)
    for row in prange(n_rows):
        base = row0 + row * stride
        obase = orow0 + row * ostride
        wbase = wrow0 + row * wstride
        x = flat[base:base + vocab]
        out = oflat[obase:obase + vocab]
        like = tvalue(x[0], cap, ratio)
        k = kscale(x[0], cap, inv_t)
        a, b, c, d, e = coef[0, row], coef[1, row], coef[2, row], coef[3, row], coef[4, row]
        if a == 0.0 and b == 0.0 and c == 0.0 and d == 0.0 and e == 0.0:
            for j in range(vocab):
                out[j] = encode(zero_like(like), out[0])
            continue
        wrow = _slice(wflat, wbase, wbase + vocab)
        kw = kscale(_wfirst(wrow, x[0]), cap, inv_t)
        mh, ml = split_shift(m[row], cap, inv_t, like)
        wh, wl = split_shift(m_w[row], cap, inv_t, like)
        inv_s = _cast(1.0 / s[row], like)
        ca, cb, cd, ce = _cast(a, like), _cast(b, like), _cast(d, like), _cast(e, like)
        label = y[row]
        label = label if label < vocab else -1  # range-checked upstream; keeps reads in bounds
        g_label = zero_like(like)
        if label >= 0:  # read before the row is overwritten (out may alias x)
            v = tvalue(x[label], cap, ratio)
            rel = _rel(v, mh, ml, k)
            p = fast_exp(rel) * inv_s
            g = cd + _cast(c, like)
            if p > zero_like(like):
                g += p * _inner(ca, cb, ce, rel, wrow, label, wh, wl, kw, cap, ratio)
            g_label = g * dscale(v, cap, inv_t, k)
        if simd and b == 0.0 and e == 0.0 and _fast_row(x, out, m[row], s[row], a, d, wrow, cap, k):
            if label >= 0:
                out[label] = encode(g_label, out[0])
            continue
        buf = _buffer(min(CHUNK, vocab), like)
        for start in range(0, vocab, CHUNK):
            stop = min(start + CHUNK, vocab)
            _chunk_grad(x[start:stop], _slice(wrow, start, stop), buf, mh, ml, k, wh, wl, kw, inv_s,
                        ca, cb, cd, ce, cap, inv_t, ratio)
            part = out[start:stop]
            for j in range(stop - start):
                part[j] = encode(buf[j], part[0])
        if label >= 0:
            out[label] = encode(g_label, out[0])


_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint16), np.dtype(np.int16))


def _coef_array(coef: GradCoef, n: int) -> np.ndarray:
    table = np.zeros((5, n))
    for i, values in enumerate(coef):
        if values is not None:
            table[i] = np.broadcast_to(np.asarray(values, dtype=np.float64), (n,))
    return table


def row_grad(x: np.ndarray, y: np.ndarray, spec: StatsSpec, stats: RowStats, coef: GradCoef,
             out: np.ndarray, w: np.ndarray | None = None) -> None:
    """Write the gradient of one block into ``out`` (see :mod:`ptx_numba._rowpass`).

    Parameters
    ----------
    x : ndarray, shape (n, V)
        Encoded logits (unit stride along V, any row stride).
    y : ndarray of int64, shape (n,)
        Label per row, or -1.
    spec : StatsSpec
        The transform (temperature, softcap) the statistics were taken under.
    stats : RowStats
        ``m``, ``s`` (and ``m_w`` when ``coef.E`` is given) from :func:`.rowpass.row_stats`.
    coef : GradCoef
        Per-row coefficients; None means 0.
    out : ndarray, shape (n, V)
        Writable, unit stride along V, float32 / float64 / uint16 (bfloat16 bits) / int16
        (float16 bits). May be ``x`` itself.
    w : ndarray, shape (n, V), optional
        The second logit set (needed when ``coef.E`` is given).
    """
    flat, row0, stride = flat_rows(x)
    n, vocab = x.shape
    if not isinstance(out, np.ndarray) or out.shape != x.shape:
        raise ValueError(f"out must be a NumPy array of shape {x.shape}, got {getattr(out, 'shape', None)}")
    if out.dtype not in _OUT_DTYPES:
        raise ValueError(f"out has dtype {out.dtype}; expected float32, float64, uint16 or int16")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    oflat, orow0, ostride = flat_rows(out, "out", writeable=True)
    if not (isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (n,)):
        raise ValueError(f"y must be an int64 array of shape ({n},)")
    if n == 0 or vocab == 0:
        return
    table = _coef_array(coef, n)
    cap = float(spec.softcap) if spec.softcap > 0.0 else None
    inv_t = float(spec.inv_temperature)
    m = np.ascontiguousarray(stats.m, dtype=np.float64)
    s = np.ascontiguousarray(stats.s, dtype=np.float64)
    if coef.E is not None:
        if w is None or getattr(w, "shape", None) != x.shape or stats.m_w is None:
            raise ValueError("coef.E needs w of the shape of x and stats.m_w")
        wflat, wrow0, wstride = flat_rows(w, "w")
        m_w = np.ascontiguousarray(stats.m_w, dtype=np.float64)
        grad_kernel(flat, row0, stride, wflat, wrow0, wstride, oflat, orow0, ostride,
                    np.ascontiguousarray(y), vocab, inv_t, cap, m, s, m_w, table, False)
    else:
        grad_kernel(flat, row0, stride, None, 0, 0, oflat, orow0, ostride,
                    np.ascontiguousarray(y), vocab, inv_t, cap, m, s, np.zeros(n), table,
                    _isa.for_dtype(x.dtype, config.CPU_AVX2) is not _isa.PORTABLE)
