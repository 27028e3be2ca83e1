"""Hand-written AVX2 exp-sum for float32-computed logits: the CPU kernel's hot loop.

Numba leaves vectorization to LLVM's loop vectorizer, which cannot use a register-resident lookup
table (``vpermps``) and always spends a subtraction on ``x - m``. This module writes the loop
directly as LLVM vector IR (through ``numba.extending.intrinsic``), so the work per 8 lanes drops
from 17 vector operations to 13 (plus a software prefetch per 64 bytes):

``sum_j 2**((x_j * K8 - S) / 8)``, with ``K8 = 8/ln 2`` (float32) and an integer ``S``:

1. ``x`` is clamped to ``[lo, hi]`` (two ``vmaxps``/``vminps``; NaN passes through).
2. ``s8 = fma(x, K8, MAGIC - S)`` rounds ``x*K8 - S`` to an integer ``k`` held in the low mantissa
   bits of ``s8`` (``MAGIC = 1.5 * 2**23 + 8*127`` also carries the exponent bias).
3. ``u = (MAGIC - S) - s8 = -S - k`` exactly, so ``r = fma(x, K8, u) = x*K8 - S - k`` with a single
   rounding; ``|r| <= 1/2``.
4. ``2**(k/8)``: ``k mod 8`` picks ``2**(j/8)`` from an 8-entry table in one register (``vpermps``)
   and ``k >> 3`` goes into the exponent field by one shift and one integer add.
5. ``2**(r/8) = 1 + q(r)``, ``q`` a degree-3 polynomial; the term is ``fma(scale, q, scale)``.

What it computes: with ``m = S / K8`` (the row shift, in float64), each term equals
``exp(kappa * (x - m))`` where ``kappa = K8 * ln2 / 8 = 1 - 1.3e-8``, to within 1.5 ulp (tested
on every float16 input and on random float32 inputs; 1.17 in a one-off 10 M-input run). ``kappa`` perturbs
``x - m`` by 1.3e-8 relative, less than the float32 rounding of ``x - m`` (up to 6e-8) that the
portable loop incurs. Terms
whose ``x - m`` lies below ``-87.3`` (results below ``2**-126``) are approximate to within
``2**-126`` and exactly 0 below ``-88.03`` and for ``-inf``; ``x`` above ``hi`` gives at most
``3.3e38`` (finite). NaN gives NaN. ``S`` is chosen by :func:`shift_constants`.

The path needs x86-64 with AVX2 and FMA (F16C too for float16); :data:`AVAILABLE` says whether
the host has them. Elsewhere the portable loop in :mod:`.cpu` runs.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._simd import NATIVE_F16, is_x86_64, target_cpu_features

_LANES = 8  # float32 lanes in a 256-bit register
_STEP = 2 * _LANES  # elements per loop iteration: one 256-bit load of 16-bit data, two of float32

#: Software prefetch distance of the float32 loop (bytes). That loop is fast enough that the
#: hardware prefetcher alone leaves it waiting on memory: 4 KiB ahead cut [512, 128256] float32 from
#: 19.0 to 15.3 ms on one thread (Zen 3; throwaway A/B builds, 2 KiB and 8 KiB no better). The 16-bit loops are
#: compute bound and got ~7% slower with it (two prefetches per cache line), so they do without.
#: A compile-time constant, because Numba's cache would not notice a runtime setting.
PREFETCH_BYTES = 4096

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

# Table entry j holds the bits of 2**(j/8) minus what the shifted s8 bits add back: the exponent
# bias (127 << 23) and j itself (j << 20, since s8's low bits are 8*(n+127) + j).
_TABLE = [int(np.float32(2.0 ** (j / 8.0)).view(np.uint32)) - (127 << 23) - (j << 20) for j in range(8)]
# 2**(r/8) - 1 ~ r*(A1 + r*(A2 + r*A3)) on |r| <= 1/2, fitted for minimum relative error
# (Lawson iterations, then a search over neighbouring float32 values): fit error 2.7e-8 (0.45 ulp).
_A1 = 0.08664340525865555
_A2 = 0.003754026023671031
_A3 = 0.00010839102469617501

#: Encodings this module reads, and the bits that decode to -inf (the padding of a partial block).
_NEG_INF_BITS = {types.float32: -np.inf, types.uint16: 0xFF80, types.int16: -1024}  # 0xFC00


#: True where the hand-written loop can run (x86-64 with AVX2 and FMA).
AVAILABLE = is_x86_64() and {"avx2", "fma"} <= target_cpu_features()


def supports(dtype: np.dtype) -> bool:
    """Whether :func:`expsum` handles this encoded logits dtype on this host."""
    if not AVAILABLE:
        return False
    if dtype == np.float32 or dtype == np.uint16:
        return True
    return dtype == np.int16 and NATIVE_F16


@njit(cache=True)
def shift_constants(shift):
    """The constants of :func:`expsum` for a row shift near ``shift`` (finite, float).

    Returns ``(m, ms, lo, hi)``: ``m = S/K8`` (float64) is the shift actually used, ``ms = MAGIC - S``
    and the clamp bounds ``lo``, ``hi`` (float32; ``k`` at ``lo`` is exactly ``_K_MIN``).
    Requires ``abs(shift * K8) < S_LIMIT`` (|shift| < ~3.6e5).
    """
    k8 = float(K8)
    s = float(round(float(shift) * k8))
    lo = np.float32((s + _K_MIN) / k8)
    hi = np.float32((s + _K_MAX) / k8)
    return s / k8, np.float32(MAGIC - s), lo, hi


# --------------------------------------------------------------------------------------------
# IR emission
# --------------------------------------------------------------------------------------------
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I16 = ir.IntType(16)
_VF = ir.VectorType(_F32, _LANES)
_VI = ir.VectorType(_I32, _LANES)


def _splat(value, vtype=_VF):
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


def _broadcast(builder, scalar):
    one = builder.insert_element(ir.Constant(_VF, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_VF, ir.Undefined), _splat(0, _VI))


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _fma(builder, a, b, c):
    return _call(builder, "llvm.fma.v8f32", _VF, [a, b, c])


def _emit_terms(builder, x, k8, ms, lo, hi):
    """``2**((x*K8 - S)/8)`` for one <8 x float> (see the module docstring)."""
    # "x < lo ? lo : x": NaN compares false and passes through (one vmaxps).
    x = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
    x = builder.select(builder.fcmp_ordered(">", x, hi), hi, x)
    s8 = _fma(builder, x, k8, ms)
    r = _fma(builder, x, k8, builder.fsub(ms, s8))
    bits = builder.bitcast(s8, _VI)
    table = builder.bitcast(ir.Constant(_VI, [ir.Constant(_I32, t) for t in _TABLE]), _VF)
    entry = builder.bitcast(_call(builder, "llvm.x86.avx2.permps", _VF, [table, bits]), _VI)
    scale = builder.bitcast(builder.add(entry, builder.shl(bits, _splat(20, _VI))), _VF)
    q = _fma(builder, _fma(builder, _splat(_A3), r, _splat(_A2)), r, _splat(_A1))
    return _fma(builder, scale, builder.fmul(q, r), scale)


def _decode_block(builder, raw, dtype):
    """Two <8 x float> from one block of 16 stored elements (lane order is irrelevant to a sum)."""
    if dtype == types.float32:
        lo_half = builder.shuffle_vector(raw, raw, ir.Constant(_VI, list(range(8))))
        hi_half = builder.shuffle_vector(raw, raw, ir.Constant(_VI, list(range(8, 16))))
        return lo_half, hi_half
    if dtype == types.uint16:
        # bfloat16 -> float32 is "bits << 16": interleaving with zero words does it for 8 lanes
        # in one vpunpck{l,h}wd.
        zero = ir.Constant(raw.type, None)
        vi16 = ir.VectorType(_I32, 16)
        lo_idx = [i for g in (0, 8) for w in range(4) for i in (16, g + w)]
        hi_idx = [i for g in (4, 12) for w in range(4) for i in (16, g + w)]
        out = []
        for idx in (lo_idx, hi_idx):
            words = builder.shuffle_vector(raw, zero, ir.Constant(vi16, idx))
            out.append(builder.bitcast(words, _VF))
        return tuple(out)
    # float16: one vcvtph2ps per 8 lanes
    wide = builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(_F32, 16))
    lo_half = builder.shuffle_vector(wide, wide, ir.Constant(_VI, list(range(8))))
    hi_half = builder.shuffle_vector(wide, wide, ir.Constant(_VI, list(range(8, 16))))
    return lo_half, hi_half


def _element_ir_type(dtype):
    return _F32 if dtype == types.float32 else _I16


def _block_pointer(builder, data, index, dtype):
    block = ir.VectorType(_element_ir_type(dtype), _STEP)
    base = builder.bitcast(data, ir.PointerType(_element_ir_type(dtype)))
    return builder.bitcast(builder.gep(base, [index]), ir.PointerType(block)), block


def _load_tail(builder, data, start, count, dtype):
    """The last ``count < 16`` elements from ``start``, padded with the encoding of -inf."""
    ptr, block = _block_pointer(builder, data, start, dtype)
    lanes = ir.Constant(ir.VectorType(_I64, _STEP), list(range(_STEP)))
    limit = builder.insert_element(ir.Constant(ir.VectorType(_I64, _STEP), ir.Undefined), count,
                                   ir.Constant(_I32, 0))
    limit = builder.shuffle_vector(limit, limit, ir.Constant(ir.VectorType(_I32, _STEP), [0] * _STEP))
    mask = builder.icmp_signed("<", lanes, limit)
    pad = ir.Constant(block, [ir.Constant(block.element, _NEG_INF_BITS[dtype])] * _STEP)
    name = f"llvm.masked.load.v{_STEP}{'f32' if dtype == types.float32 else 'i16'}.p0"
    return _call(builder, name, block, [ptr, ir.Constant(_I32, 2 if dtype != types.float32 else 4), mask, pad])


def _prefetch(builder, ptr):
    """Ask for the cache line ``PREFETCH_BYTES`` ahead (prefetcht0; never faults, even past the end)."""
    ahead = builder.gep(builder.bitcast(ptr, ir.PointerType(ir.IntType(8))), [ir.Constant(_I64, PREFETCH_BYTES)])
    args = [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]  # read, keep, data
    _call(builder, "llvm.prefetch.p0", ir.VoidType(), args)


def _horizontal_sum(builder, vec):
    total = builder.extract_element(vec, ir.Constant(_I32, 0))
    for lane in range(1, _LANES):
        total = builder.fadd(total, builder.extract_element(vec, ir.Constant(_I32, lane)))
    return total


@intrinsic
def expsum(typingctx, chunk, k8, ms, lo, hi):
    """``sum_j 2**((chunk[j]*K8 - S)/8)`` as float32 (Numba-only; see the module docstring).

    ``chunk`` is a 1-D C-contiguous float32 / uint16 (bfloat16 bits) / int16 (float16 bits) array;
    ``k8`` is :data:`K8` and ``ms, lo, hi`` come from :func:`shift_constants` (all float32). Each
    of the two float32 accumulators adds one term per lane every 16 elements, so a 2048-element
    chunk adds 128 terms per lane.
    """
    if not (isinstance(chunk, types.Array) and chunk.ndim == 1 and chunk.layout == "C"
            and chunk.dtype in _NEG_INF_BITS
            and all(arg == types.float32 for arg in (k8, ms, lo, hi))):
        return None
    dtype = chunk.dtype

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        n = builder.extract_value(array.shape, 0)
        consts = [_broadcast(builder, value) for value in args[1:]]
        step = ir.Constant(_I64, _STEP)
        n_full = builder.sdiv(n, step)
        remainder = builder.sub(n, builder.mul(n_full, step))
        zero = _splat(0.0)

        entry = builder.block
        loop = builder.append_basic_block("expsum.loop")
        after_loop = builder.append_basic_block("expsum.after_loop")
        tail = builder.append_basic_block("expsum.tail")
        done = builder.append_basic_block("expsum.done")
        builder.cbranch(builder.icmp_signed(">", n_full, ir.Constant(_I64, 0)), loop, after_loop)

        builder.position_at_end(loop)
        index = builder.phi(_I64)
        acc_a = builder.phi(_VF)
        acc_b = builder.phi(_VF)
        ptr, _ = _block_pointer(builder, array.data, builder.mul(index, step), dtype)
        raw = builder.load(ptr, align=4 if dtype == types.float32 else 2)
        if dtype == types.float32:
            _prefetch(builder, ptr)
        x_a, x_b = _decode_block(builder, raw, dtype)
        new_a = builder.fadd(acc_a, _emit_terms(builder, x_a, *consts))
        new_b = builder.fadd(acc_b, _emit_terms(builder, x_b, *consts))
        next_index = builder.add(index, ir.Constant(_I64, 1))
        builder.cbranch(builder.icmp_signed("<", next_index, n_full), loop, after_loop)
        index.add_incoming(ir.Constant(_I64, 0), entry)
        index.add_incoming(next_index, loop)
        for phi, new in ((acc_a, new_a), (acc_b, new_b)):
            phi.add_incoming(zero, entry)
            phi.add_incoming(new, loop)

        builder.position_at_end(after_loop)
        sum_a = builder.phi(_VF)
        sum_b = builder.phi(_VF)
        for phi, new in ((sum_a, new_a), (sum_b, new_b)):
            phi.add_incoming(zero, entry)
            phi.add_incoming(new, loop)
        builder.cbranch(builder.icmp_signed(">", remainder, ir.Constant(_I64, 0)), tail, done)

        builder.position_at_end(tail)
        raw = _load_tail(builder, array.data, builder.mul(n_full, step), remainder, dtype)
        x_a, x_b = _decode_block(builder, raw, dtype)
        tail_a = builder.fadd(sum_a, _emit_terms(builder, x_a, *consts))
        tail_b = builder.fadd(sum_b, _emit_terms(builder, x_b, *consts))
        builder.branch(done)

        builder.position_at_end(done)
        final_a = builder.phi(_VF)
        final_b = builder.phi(_VF)
        for phi, via_tail, direct in ((final_a, tail_a, sum_a), (final_b, tail_b, sum_b)):
            phi.add_incoming(direct, after_loop)
            phi.add_incoming(via_tail, tail)
        return _horizontal_sum(builder, builder.fadd(final_a, final_b))

    return types.float32(chunk, k8, ms, lo, hi), codegen
