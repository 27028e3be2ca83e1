"""Scalar building blocks for the CPU kernels, written so LLVM vectorizes the loops that call them.

* :func:`f32_from_bits` / :func:`f32_to_bits` (and the 64-bit pair): bit reinterpretation, which
  Numba has no scalar spelling for.
* :func:`fast_exp`: ``exp`` for float32 and float64 built from a Cody-Waite range reduction, a
  polynomial and an exponent written straight into the float's bits. Numba >= 0.62 has no SVML, so
  ``math.exp`` in a loop becomes one scalar ``expf`` call per element; this one vectorizes.
* :func:`decode`: turns a stored element into the float it encodes (see :mod:`._validate`):
  float32/float64 unchanged, ``uint16`` as bfloat16 bits, ``int16`` as IEEE float16 bits (by the
  CPU's half->float instruction where it has one, else by bit manipulation; both exact).

Accuracy of :func:`fast_exp` (tested in ``tests/test_simd.py``): within 1.4 ulp of the correctly
rounded result for float32 and 4.5e-16 relative for float64, over every input whose result is a
normal number. Inputs below ``-88`` (float32) / ``-708`` (float64), and ``-inf``, give exactly 0
(results that would be subnormal are flushed to zero); inputs above the overflow threshold give
``+inf``; NaN gives NaN. Finite input never gives NaN.
"""
from __future__ import annotations

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


# --------------------------------------------------------------------------------------------
# bit casts
# --------------------------------------------------------------------------------------------
def _bitcast(name, source, target, llvm_target):
    """A Numba intrinsic reinterpreting the bits of a ``source`` scalar as ``target``."""

    def impl(typingctx, value):
        if value != source:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_target)

        return target(source), codegen

    impl.__name__ = impl.__qualname__ = name
    return intrinsic(impl)


f32_from_bits = _bitcast("f32_from_bits", types.uint32, types.float32, ir.FloatType())
f32_to_bits = _bitcast("f32_to_bits", types.float32, types.uint32, ir.IntType(32))
f64_from_bits = _bitcast("f64_from_bits", types.uint64, types.float64, ir.DoubleType())
f64_to_bits = _bitcast("f64_to_bits", types.float64, types.uint64, ir.IntType(64))


# --------------------------------------------------------------------------------------------
# exp
# --------------------------------------------------------------------------------------------
# Only "contract" (fused multiply-add): "reassoc" would fold the round-to-integer trick
# (x + MAGIC) - MAGIC into x, and "nnan"/"ninf" would make the -inf/NaN handling undefined.
_EXP_FLAGS = {"contract"}

# float32: e**x = 2**k * e**r, k = round(x / ln2), r = x - k*ln2 with ln2 split in two (the high
# part has trailing zero bits, so k*LN2_HI is exact for |k| < 2**13); e**r on |r| <= ln2/2 by a
# degree-6 polynomial fitted for minimum relative error (fit error 1.9e-9, below float32 rounding).
_F32_LOG2E = np.float32(1.4426950408889634)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(math.log(2.0) - 0.693359375)
# 1.5 * 2**23 + 127: adding it rounds x/ln2 to an integer k held in the low mantissa bits, already
# biased (k + 127), so shifting those bits into the exponent field gives 2**k with no integer add.
_F32_ROUND_BIASED = np.float32(12582912.0 + 127.0)
_F32_MIN_X = np.float32(-88.0)  # rounds to k = -127: the 2**k bits become 0, so the result is 0
_F32_MAX_X = np.float32(88.72284)  # rounds to k = 128: the 2**k bits become +inf
_F32_SHIFT = np.uint32(23)
_F32_P2 = np.float32(0.49999991059303284)
_F32_P3 = np.float32(0.16666419804096222)
_F32_P4 = np.float32(0.04166822507977486)
_F32_P5 = np.float32(0.008374787867069244)
_F32_P6 = np.float32(0.0013836742145940661)
_F32_ONE = np.float32(1.0)


@njit(fastmath=_EXP_FLAGS, cache=True)
def _exp_f32(x):
    # Clamp first: it bounds k to [-127, 128] so the exponent bits below cannot wrap. Numba's
    # min/max return NaN for a NaN operand (so NaN passes through) and compile to one vminps /
    # vmaxps each; the "a if a < b else b" spelling costs a compare and a blend more.
    xc = min(max(x, _F32_MIN_X), _F32_MAX_X)
    shifted = xc * _F32_LOG2E + _F32_ROUND_BIASED
    k = shifted - _F32_ROUND_BIASED
    r = xc - k * _F32_LN2_HI
    r = r - k * _F32_LN2_LO
    # Estrin's scheme: the same polynomial as Horner's rule, but a dependency chain of 4 FMAs
    # instead of 6, which keeps more loop iterations in flight (~15% faster on Zen 3).
    r2 = r * r
    low = r + _F32_ONE
    mid = _F32_P3 * r + _F32_P2
    high = _F32_P5 * r + _F32_P4
    high = _F32_P6 * r2 + high
    mid = high * r2 + mid
    p = mid * r2 + low
    # The low mantissa bits of `shifted` hold k + 127; shifted into the exponent field they build
    # 2**k (k = -127 gives 0.0, k = 128 gives +inf).
    scale = f32_from_bits(np.uint32(f32_to_bits(shifted) << _F32_SHIFT))
    return p * scale


# float64: same scheme; degree-12 Taylor polynomial (remainder < 2e-16 relative on |r| <= ln2/2).
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 0.6931471803691238  # 32 significant bits: k*LN2_HI exact for |k| < 2**20
_F64_LN2_LO = 1.9082149292705877e-10
_F64_ROUND_BIASED = 6755399441055744.0 + 1023.0  # 1.5 * 2**52, plus the exponent bias
_F64_MIN_X = -709.0  # rounds to k = -1023: 2**k bits become 0
_F64_MAX_X = 709.8  # rounds to k = 1024: 2**k bits become +inf
_F64_SHIFT = np.uint64(52)
(_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12) = (
    1.0 / math.factorial(n) for n in range(2, 13))


@njit(fastmath=_EXP_FLAGS, cache=True)
def _exp_f64(x):
    xc = min(max(x, _F64_MIN_X), _F64_MAX_X)
    shifted = xc * _F64_LOG2E + _F64_ROUND_BIASED
    k = shifted - _F64_ROUND_BIASED
    r = xc - k * _F64_LN2_HI
    r = r - k * _F64_LN2_LO
    # Estrin's scheme over pairs of terms: depth 5 instead of Horner's 12.
    r2 = r * r
    r4 = r2 * r2
    r8 = r4 * r4
    s0 = (_C3 * r + _C2) * r2 + (r + 1.0)
    s1 = (_C7 * r + _C6) * r2 + (_C5 * r + _C4)
    s2 = (_C11 * r + _C10) * r2 + (_C9 * r + _C8)
    p = (_C12 * r4 + s2) * r8 + (s1 * r4 + s0)
    scale = f64_from_bits(np.uint64(f64_to_bits(shifted) << _F64_SHIFT))
    return p * scale


def fast_exp(x):
    """Vectorizable ``exp`` for float32 or float64 scalars (usable only inside Numba code)."""
    raise NotImplementedError("fast_exp is a Numba-only function")


@overload(fast_exp, jit_options={"fastmath": _EXP_FLAGS, "cache": True})
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


# --------------------------------------------------------------------------------------------
# decoding stored elements
# --------------------------------------------------------------------------------------------
_U16_MASK = np.uint32(0xFFFF)
_F16_SIGN = np.uint32(0x8000)
_F16_ABS = np.uint32(0x7FFF)
_F16_INF_BITS = np.uint32(0x7C00)
_F32_EXP_BITS = np.uint32(0x7F800000)
_SHIFT13 = np.uint32(13)
_SHIFT16 = np.uint32(16)
# Moving a half's exponent+mantissa up 13 bits gives a float32 whose exponent is 112 too small
# (bias 15 vs 127); multiplying by 2**112 fixes it, and does so exactly for subnormal halves too.
_F16_REBIAS = np.float32(2.0**112)


@njit(fastmath=_EXP_FLAGS, cache=True)
def _bf16_to_f32(bits):
    return f32_from_bits(np.uint32(np.uint32(bits) << _SHIFT16))


@njit(fastmath=_EXP_FLAGS, cache=True)
def _f16_to_f32(bits):
    # Numba widens uint32 arithmetic to 64 bits; each np.uint32(...) narrows it back.
    h = np.uint32(np.uint32(bits) & _U16_MASK)  # int16 storage: drop the sign extension
    magnitude = np.uint32(h & _F16_ABS)
    moved = np.uint32(magnitude << _SHIFT13)
    finite = f32_from_bits(moved) * _F16_REBIAS
    special = f32_from_bits(np.uint32(moved | _F32_EXP_BITS))  # inf, or NaN keeping its payload
    value = special if magnitude >= _F16_INF_BITS else finite
    sign = np.uint32(np.uint32(h & _F16_SIGN) << _SHIFT16)
    return f32_from_bits(np.uint32(f32_to_bits(value) | sign))


@intrinsic
def _f16_to_f32_native(typingctx, bits):
    """float16 bits -> float32 by LLVM's ``fpext half``: one ``vcvtph2ps`` per 8 lanes with F16C."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


def target_cpu_features() -> frozenset[str]:
    """The x86 features (``"avx2"``, ``"f16c"``, ...) Numba compiles for; empty where unknown.

    Follows Numba's target choice: an explicit ``NUMBA_CPU_FEATURES`` list (e.g. for portable
    caches) wins; a named non-host ``NUMBA_CPU_NAME`` means "assume nothing beyond the baseline";
    otherwise the host CPU's features.
    """
    try:
        import numba
        from llvmlite import binding as llvm

        if numba.config.CPU_FEATURES is not None:
            features = numba.config.CPU_FEATURES
        elif numba.config.CPU_NAME not in (None, "host"):
            return frozenset()
        else:
            features = llvm.get_host_cpu_features().flatten()
        return frozenset(f[1:] for f in features.split(",") if f.startswith("+"))
    except Exception:  # feature query unsupported: assume nothing
        return frozenset()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _has_native_f16_conversion() -> bool:
    """True where LLVM turns ``fpext half`` into a hardware instruction, not a runtime-library call.

    x86-64 needs the F16C extension (every x86 CPU since about 2013); AArch64 always has it.
    Elsewhere the bit-manipulating :func:`_f16_to_f32` is used: exact everywhere, ~1.7x slower.
    """
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return is_x86_64() and "f16c" in target_cpu_features()


NATIVE_F16 = _has_native_f16_conversion()


def decode(v):
    """The float a stored logit encodes (float32 for 16-bit encodings; Numba-only)."""
    raise NotImplementedError("decode is a Numba-only function")


@overload(decode, jit_options={"fastmath": _EXP_FLAGS, "cache": True})
def _decode_overload(v):
    if v in (types.float32, types.float64):
        return lambda v: v
    if v == types.uint16:
        return lambda v: _bf16_to_f32(v)
    if v == types.int16:
        if NATIVE_F16:
            return lambda v: _f16_to_f32_native(v)
        return lambda v: _f16_to_f32(v)
    return None


def neg_inf_like(v):
    """``-inf`` in the compute type of a stored element (Numba-only)."""
    raise NotImplementedError


@overload(neg_inf_like, jit_options={"cache": True})
def _neg_inf_like_overload(v):
    if v == types.float64:
        return lambda v: -np.inf
    return lambda v: np.float32(-np.inf)


def zero_like(v):
    """``0`` in the compute type of a stored element (Numba-only)."""
    raise NotImplementedError


@overload(zero_like, jit_options={"cache": True})
def _zero_like_overload(v):
    if v == types.float64:
        return lambda v: 0.0
    return lambda v: np.float32(0.0)
