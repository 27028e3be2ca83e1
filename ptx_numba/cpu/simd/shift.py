"""Shift arithmetic of the AVX2 exp-sum loops (:mod:`.avx2`): where a row's shift goes in them.

The loops never form ``x - m``. They sum ``2**((x*K8 - S)/8)`` (float32 lanes) or
``2**(x*K1 - S)`` (float64 lanes) for an *integer* ``S`` folded into one FMA constant
``MAGIC - S``, so the shift is really the real number ``S/K``. This module picks ``S`` for a
shift, the clamp bounds that pin ``k`` to the finite range of the scale's exponent, the float64
shift ``m = fl(S/K)`` the kernel reports, and ``corr``, the factor that moves the sum from ``S/K``
onto ``m`` exactly (see :func:`_shift_and_correction`).

Inside Numba code, :func:`constants` and :func:`shift_limit` choose the float32 or float64 set
by the type of the decoded shift, so one walk in :mod:`ptx_numba.cpu.rowpass` serves every encoding.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

#: 8 / ln 2 in float32.
K8 = np.float32(8.0 / math.log(2.0))
#: kappa - 1: the relative perturbation of ``x - m`` by the float32 rounding of K8 (-1.3e-8).
KAPPA_MINUS_ONE = float(K8) * math.log(2.0) / 8.0 - 1.0
#: 1.5 * 2**23 (rounds to an integer in the mantissa) + 8 * 127 (the exponent bias of 2**(k/8)).
MAGIC = 12582912.0 + 1016.0
_K_MIN = -1016  # k = -1016: biased exponent 0 and table index 0, so the scale's bits are all 0
_K_MAX = 1023  # k = 1023: biased exponent 254, the largest finite one
#: |S| bound: keeps MAGIC - S in [2**23, 2**24) (unit spacing) with the clamped k range inside.
S_LIMIT = 2.0**22 - 2048.0

#: 1/ln 2 in float64 (kappa - 1 ~ 1e-16: negligible).
K1_F64 = 1.0 / math.log(2.0)
#: 1.5 * 2**52 (rounds to an integer in the mantissa) + 1023 (the exponent bias of 2**k).
MAGIC64 = 6755399441055744.0 + 1023.0
_K64_MIN = -1023  # biased exponent 0: 2**k's bits are all 0
_K64_MAX = 1023  # biased exponent 2046, the largest finite one
#: |S| bound of the float64 loop (keeps MAGIC64 - S in [2**52, 2**53) with room for k).
S_LIMIT64 = 2.0**50


@intrinsic
def _fma_f64(typingctx, a, b, c):
    """``a*b + c`` with one rounding (float64 scalars; Numba-only)."""
    if not all(arg == types.float64 for arg in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f64 = ir.DoubleType()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f64, [f64] * 3), "llvm.fma.f64")
        return builder.call(fma, list(args))

    return types.float64(a, b, c), codegen


@njit(cache=True)
def _shift_and_correction(s, k, bits_per_unit):
    """``m = fl(s/k)`` and the factor that moves a sum taken against the exact ``s/k`` onto ``m``.

    The loops sum ``2**((x*k - s)/bits_per_unit)``, i.e. against the real number ``s/k``, which is
    not a float64. Multiplying by ``2**((s - k*m)/bits_per_unit)`` makes the sum one against ``m``
    itself; ``s - k*m`` is formed exactly (Sterbenz, then the FMA residual of the product). Without
    it, CE would carry ``|s/k - m|`` (up to 1.1e-16 |m|, 1e-10 at offsets of 1e6) as an absolute
    error.
    """
    m = s / k
    product = k * m
    residual = (s - product) - _fma_f64(k, m, -product)
    return m, math.exp(residual * math.log(2.0) / bits_per_unit)


@njit(cache=True)
def shift_constants(shift):
    """The float32 constants of :func:`expsum` for a row shift near ``shift`` (finite, float).

    Returns ``(m, ms, lo, hi, corr)``: ``m`` (float64) is the shift actually used, ``ms = MAGIC - S``
    and the clamp bounds ``lo``, ``hi`` (float32; ``k`` at ``lo`` is exactly ``_K_MIN``), and
    ``corr`` (float64) the factor that turns a sum from :func:`expsum` into ``sum exp(x - m)``.
    Requires ``abs(shift * K8) < S_LIMIT`` (|shift| < ~3.6e5).
    """
    k8 = np.float64(K8)
    s = float(round(np.float64(shift) * k8))
    lo = np.float32((s + _K_MIN) / k8)
    hi = np.float32((s + _K_MAX) / k8)
    m, corr = _shift_and_correction(s, k8, 8.0)
    return m, np.float32(MAGIC - s), lo, hi, corr


@njit(cache=True)
def shift_constants_f64(shift):
    """:func:`shift_constants` of the float64 loop: ``(m, ms, lo, hi, corr)``, all float64.

    Requires ``abs(shift * K1_F64) < S_LIMIT64``. ``k`` at ``lo`` is exactly ``-1023`` (term 0.0).
    """
    s = float(round(shift * K1_F64))
    m, corr = _shift_and_correction(s, K1_F64, 1.0)
    return m, MAGIC64 - s, (s + _K64_MIN) / K1_F64, (s + _K64_MAX) / K1_F64, corr


def constants(shift):
    """``(m, K, ms, lo, hi, corr)`` for :func:`expsum`, in the type of ``shift`` (Numba-only).

    ``m`` and ``corr`` are float64: ``corr * expsum(...)`` is ``sum exp(x - m)``."""
    raise NotImplementedError("constants is a Numba-only function")


@overload(constants, jit_options={"cache": True})
def _constants_overload(shift):
    if shift == types.float64:
        def impl64(shift):
            m, ms, lo, hi, corr = shift_constants_f64(shift)
            return m, K1_F64, ms, lo, hi, corr
        return impl64
    if shift == types.float32:
        def impl32(shift):
            m, ms, lo, hi, corr = shift_constants(shift)
            return m, K8, ms, lo, hi, corr
        return impl32
    return None


def shift_limit(shift):
    """The largest ``|shift|`` :func:`constants` accepts for a shift of this type (Numba-only)."""
    raise NotImplementedError("shift_limit is a Numba-only function")


@overload(shift_limit, jit_options={"cache": True})
def _shift_limit_overload(shift):
    limit = S_LIMIT64 / K1_F64 if shift == types.float64 else S_LIMIT / float(K8)
    return lambda shift: limit
