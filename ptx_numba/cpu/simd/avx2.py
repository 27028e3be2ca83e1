"""Hand-written AVX2 exp-sum for float32-computed logits: the CPU kernel's hot loop.

Numba leaves vectorization to LLVM's loop vectorizer, which cannot use a register-resident lookup
table (``vpermps``) and always spends a subtraction on ``x - m``. This module writes the loop
directly as LLVM vector IR (through ``numba.extending.intrinsic``), so the work per 8 lanes drops
from 17 vector operations to 13 (plus, except for float16, a software prefetch per 64 bytes):

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
``3.3e38`` (finite). NaN gives NaN. ``S`` is chosen by :func:`.shift.shift_constants`.

**float64** logits get a sibling loop in 4 double lanes, ``sum_j 2**(x_j * K1 - S)`` with
``K1 = 1/ln 2`` (float64): the same clamps and exact FMA range reduction (``MAGIC64 = 1.5 * 2**52 +
1023``), ``2**k`` straight from the shifted bits (no table), and ``2**r`` for ``|r| <= 1/2`` by a
degree-9 polynomial (Chebyshev-node fit, 3.7e-14 relative), accumulated by one FMA per lane. Each
term is ``exp(x - m)`` (``m = S/K1``) to within 5e-14 relative; below ``x - m = -709.1`` and for
``-inf`` it is exactly 0, above ``+709.4`` it stays finite (<= 1.8e308).

The path needs x86-64 with AVX2 and FMA (F16C too for float16); :data:`AVAILABLE` says whether
the host has them. Elsewhere the portable loop in :mod:`ptx_numba.cpu.rowpass` runs. The shift arithmetic
(:func:`constants`, :func:`shift_limit`, which pick the float32 or float64 set by the type of the
decoded shift, so one walk serves every encoding) is in :mod:`.shift` and re-exported here.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# The shift arithmetic lives in .shift; callers reach it through this module, beside the loop.
from .shift import (  # noqa: F401  (re-exported)
    K1_F64,
    K8,
    KAPPA_MINUS_ONE,
    MAGIC,
    MAGIC64,
    S_LIMIT,
    S_LIMIT64,
    constants,
    shift_constants,
    shift_constants_f64,
    shift_limit,
)
from .primitives import NATIVE_F16, is_x86_64, target_cpu_features

_LANES = 8  # float32 lanes in a 256-bit register

#: Software prefetch distance (bytes), one prefetch per loop iteration. With the hardware
#: prefetcher alone the loops wait on memory: 4 KiB ahead cut [512, 128256] float32 from 19.0 to
#: 15.3 ms on one thread, and float64 from 35.0 to 28.0 ms on two (Zen 3; throwaway A/B builds,
#: 2 KiB and 8 KiB no better). A compile-time constant, because Numba's cache would not notice a
#: runtime setting.
PREFETCH_BYTES = 4096

#: Per encoding: elements per loop iteration and whether the iteration prefetches. Every step
#: but float16's is one 64-byte cache line, so a prefetch per iteration is one per line.
#: bfloat16 reads 32 elements per iteration (was 16 with no prefetch): 7.25-7.5 ms against
#: 7.9-8.0 ms for [512, 128256] on two threads (min of 40 calls, 3 alternating processes each).
#: float16 measured 0.3-0.5 ms *slower* that way (its vcvtph2ps is not the bottleneck the
#: prefetches relieve), so it keeps 16 elements and no prefetch.
_STEP_AND_PREFETCH = {types.float32: (16, True), types.float64: (8, True), types.uint16: (32, True),
                      types.int16: (16, False)}


# Table entry j holds the bits of 2**(j/8) minus what the shifted s8 bits add back: the exponent
# bias (127 << 23) and j itself (j << 20, since s8's low bits are 8*(n+127) + j).
_TABLE = [int(np.float32(2.0 ** (j / 8.0)).view(np.uint32)) - (127 << 23) - (j << 20) for j in range(8)]
# 2**(r/8) - 1 ~ r*(A1 + r*(A2 + r*A3)) on |r| <= 1/2, fitted for minimum relative error
# (Lawson iterations, then a search over neighbouring float32 values): fit error 2.7e-8 (0.45 ulp).
_A1 = 0.08664340525865555
_A2 = 0.003754026023671031
_A3 = 0.00010839102469617501

# 2**r ~ 1 + r*(C1 + C2*r + ... + C9*r**8) on |r| <= 1/2: (2**r - 1)/r interpolated at 9
# Chebyshev nodes (50-digit mpmath solve), relative error 3.7e-14 (tests/test_avx2.py checks the
# terms to 5e-14). Degree 10 (5.8e-16) cost 12% more time per element; the float64 contract is 1e-10.
_C64 = (0.6931471805599453, 0.2402265069581299, 0.055504108664760424, 0.009618129159402558,
        0.0013333558179043112, 0.00015403455852453838, 1.525268684626772e-05, 1.3255224878668817e-06,
        1.0203121063391729e-07)

#: Encodings this module reads, and the bits that decode to -inf (the padding of a partial block).
_NEG_INF_BITS = {types.float32: -np.inf, types.uint16: 0xFF80, types.int16: -1024,  # 0xFC00
                 types.float64: -np.inf}


#: True where the hand-written loop can run (x86-64 with AVX2 and FMA).
AVAILABLE = is_x86_64() and {"avx2", "fma"} <= target_cpu_features()


def supports(dtype: np.dtype) -> bool:
    """Whether :func:`expsum` handles this encoded logits dtype on this host."""
    if not AVAILABLE:
        return False
    if dtype in (np.float32, np.float64, np.uint16):
        return True
    return dtype == np.int16 and NATIVE_F16



# --------------------------------------------------------------------------------------------
# IR emission
# --------------------------------------------------------------------------------------------
_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I16 = ir.IntType(16)
_VF = ir.VectorType(_F32, _LANES)
_VI = ir.VectorType(_I32, _LANES)
_VD = ir.VectorType(_F64, 4)
_VQ = ir.VectorType(_I64, 4)


def _splat(value, vtype=_VF):
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


def _broadcast(builder, scalar):
    vtype = ir.VectorType(scalar.type, 4 if scalar.type == _F64 else _LANES)
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined), _splat(0, ir.VectorType(_I32, vtype.count)))


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _fma(builder, a, b, c):
    name = "llvm.fma.v4f64" if a.type == _VD else "llvm.fma.v8f32"
    return _call(builder, name, a.type, [a, b, c])


def _clamp(builder, x, lo, hi):
    # "x < lo ? lo : x": NaN compares false and passes through (one vmaxps/vmaxpd each).
    x = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
    return builder.select(builder.fcmp_ordered(">", x, hi), hi, x)


def _accumulate_f32(builder, acc, x, k8, ms, lo, hi):
    """``acc + 2**((x*K8 - S)/8)`` for one <8 x float> (see the module docstring)."""
    x = _clamp(builder, x, lo, hi)
    s8 = _fma(builder, x, k8, ms)
    r = _fma(builder, x, k8, builder.fsub(ms, s8))
    bits = builder.bitcast(s8, _VI)
    table = builder.bitcast(ir.Constant(_VI, [ir.Constant(_I32, t) for t in _TABLE]), _VF)
    entry = builder.bitcast(_call(builder, "llvm.x86.avx2.permps", _VF, [table, bits]), _VI)
    scale = builder.bitcast(builder.add(entry, builder.shl(bits, _splat(20, _VI))), _VF)
    q = _fma(builder, _fma(builder, _splat(_A3), r, _splat(_A2)), r, _splat(_A1))
    # Not fma(scale, fma(q, r, 1), acc), one op fewer: rounding 1 + q*r costs another 0.5 ulp
    # (1.81 ulp measured against 1.5) for 5-10% on an L1-resident chunk.
    return builder.fadd(acc, _fma(builder, scale, builder.fmul(q, r), scale))


def _accumulate_f64(builder, acc, x, k1, ms, lo, hi):
    """``acc + 2**(x*K1 - S)`` for one <4 x double>: the float64 sibling, without a table."""
    x = _clamp(builder, x, lo, hi)
    s = _fma(builder, x, k1, ms)
    r = _fma(builder, x, k1, builder.fsub(ms, s))
    # the low 12 bits of s's mantissa hold 1023 + k: shifted into the exponent field they are 2**k
    scale = builder.bitcast(builder.shl(builder.bitcast(s, _VQ), _splat(52, _VQ)), _VD)
    # 2**r = E(r*r) + r*O(r*r): two Horner chains of 4 FMAs side by side. One chain of 9
    # dependent FMAs (36 cycles) kept too few blocks in flight for the scheduler to overlap.
    r2 = builder.fmul(r, r)
    coeffs = (1.0,) + _C64
    even = _splat(coeffs[8], _VD)
    for c in coeffs[6::-2]:
        even = _fma(builder, even, r2, _splat(c, _VD))
    odd = _splat(coeffs[9], _VD)
    for c in coeffs[7::-2]:
        odd = _fma(builder, odd, r2, _splat(c, _VD))
    p = _fma(builder, odd, r, even)
    # float64 lanes leave ~1e-16 of rounding to spare, so the term is accumulated in the same FMA
    return _fma(builder, scale, p, acc)


def _decode_block(builder, raw, dtype):
    """Two vectors of lanes from one block of stored elements (lane order is irrelevant to a sum)."""
    if dtype in (types.float32, types.float64):
        half = raw.type.count // 2
        lo_half = builder.shuffle_vector(raw, raw, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi_half = builder.shuffle_vector(raw, raw, ir.Constant(ir.VectorType(_I32, half), list(range(half, 2 * half))))
        return lo_half, hi_half
    if dtype in (types.uint16, types.int16) and raw.type.count == 4 * _LANES:
        halves = [builder.shuffle_vector(raw, raw, ir.Constant(ir.VectorType(_I32, 16), list(range(h, h + 16))))
                  for h in (0, 16)]
        return tuple(v for half in halves for v in _decode_block(builder, half, dtype))
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
    return _decode_block(builder, wide, types.float32)


#: Per encoding: the LLVM element type, its masked-load suffix and its size (the load alignment).
_ELEMENT = {types.float32: (_F32, "f32", 4), types.float64: (_F64, "f64", 8), types.uint16: (_I16, "i16", 2),
            types.int16: (_I16, "i16", 2)}


def _block_pointer(builder, data, index, dtype, step):
    element = _ELEMENT[dtype][0]
    block = ir.VectorType(element, step)
    base = builder.bitcast(data, ir.PointerType(element))
    return builder.bitcast(builder.gep(base, [index]), ir.PointerType(block)), block


def _load_tail(builder, data, start, count, dtype, step):
    """The last ``count < step`` elements from ``start``, padded with the encoding of -inf."""
    ptr, block = _block_pointer(builder, data, start, dtype, step)
    lanes = ir.Constant(ir.VectorType(_I64, step), list(range(step)))
    limit = builder.insert_element(ir.Constant(ir.VectorType(_I64, step), ir.Undefined), count,
                                   ir.Constant(_I32, 0))
    limit = builder.shuffle_vector(limit, limit, ir.Constant(ir.VectorType(_I32, step), [0] * step))
    mask = builder.icmp_signed("<", lanes, limit)
    pad = ir.Constant(block, [ir.Constant(block.element, _NEG_INF_BITS[dtype])] * step)
    name = f"llvm.masked.load.v{step}{_ELEMENT[dtype][1]}.p0"
    return _call(builder, name, block, [ptr, ir.Constant(_I32, _ELEMENT[dtype][2]), mask, pad])


def _prefetch(builder, ptr):
    """Ask for the cache line ``PREFETCH_BYTES`` ahead (prefetcht0; never faults, even past the end)."""
    ahead = builder.gep(builder.bitcast(ptr, ir.PointerType(ir.IntType(8))), [ir.Constant(_I64, PREFETCH_BYTES)])
    args = [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]  # read, keep, data
    _call(builder, "llvm.prefetch.p0", ir.VoidType(), args)


def _horizontal_sum(builder, vec):
    total = builder.extract_element(vec, ir.Constant(_I32, 0))
    for lane in range(1, vec.type.count):
        total = builder.fadd(total, builder.extract_element(vec, ir.Constant(_I32, lane)))
    return total


@intrinsic
def expsum(typingctx, chunk, k, ms, lo, hi):
    """``sum_j 2**((chunk[j]*K8 - S)/8)`` (``2**(chunk[j]*K1 - S)`` for float64; Numba-only).

    ``chunk`` is a 1-D C-contiguous float32 / uint16 (bfloat16 bits) / int16 (float16 bits) array
    with float32 ``k = K8`` and ``ms, lo, hi`` from :func:`shift_constants` (result float32), or a
    float64 array with ``k = K1_F64`` and float64 constants from :func:`shift_constants_f64`
    (result float64). Two accumulators each take one term per lane every block (16 elements; 8
    for float64), so a 2048-element chunk adds 128 (float64: 256) terms per lane.
    """
    if not (isinstance(chunk, types.Array) and chunk.ndim == 1 and chunk.layout == "C"
            and chunk.dtype in _NEG_INF_BITS):
        return None
    dtype = chunk.dtype
    lane_type = types.float64 if dtype == types.float64 else types.float32
    if not all(arg == lane_type for arg in (k, ms, lo, hi)):
        return None
    step, prefetch = _STEP_AND_PREFETCH[dtype]
    accumulate = _accumulate_f64 if dtype == types.float64 else _accumulate_f32
    vtype = _VD if dtype == types.float64 else _VF

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        n = builder.extract_value(array.shape, 0)
        consts = [_broadcast(builder, value) for value in args[1:]]
        n_full = builder.sdiv(n, ir.Constant(_I64, step))
        remainder = builder.sub(n, builder.mul(n_full, ir.Constant(_I64, step)))
        zero = ir.Constant(vtype, None)

        entry = builder.block
        loop = builder.append_basic_block("expsum.loop")
        after_loop = builder.append_basic_block("expsum.after_loop")
        tail = builder.append_basic_block("expsum.tail")
        done = builder.append_basic_block("expsum.done")
        builder.cbranch(builder.icmp_signed(">", n_full, ir.Constant(_I64, 0)), loop, after_loop)

        builder.position_at_end(loop)
        index = builder.phi(_I64)
        accs = [builder.phi(vtype), builder.phi(vtype)]
        ptr, _ = _block_pointer(builder, array.data, builder.mul(index, ir.Constant(_I64, step)), dtype, step)
        raw = builder.load(ptr, align=_ELEMENT[dtype][2])
        if prefetch:
            _prefetch(builder, ptr)
        new = list(accs)
        for i, x in enumerate(_decode_block(builder, raw, dtype)):
            new[i % 2] = accumulate(builder, new[i % 2], x, *consts)
        next_index = builder.add(index, ir.Constant(_I64, 1))
        builder.cbranch(builder.icmp_signed("<", next_index, n_full), loop, after_loop)
        index.add_incoming(ir.Constant(_I64, 0), entry)
        index.add_incoming(next_index, loop)
        for phi, value in zip(accs, new):
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, loop)

        builder.position_at_end(after_loop)
        sums = [builder.phi(vtype), builder.phi(vtype)]
        for phi, value in zip(sums, new):
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed(">", remainder, ir.Constant(_I64, 0)), tail, done)

        builder.position_at_end(tail)
        raw = _load_tail(builder, array.data, builder.mul(n_full, ir.Constant(_I64, step)), remainder, dtype, step)
        tails = list(sums)
        for i, x in enumerate(_decode_block(builder, raw, dtype)):
            tails[i % 2] = accumulate(builder, tails[i % 2], x, *consts)
        builder.branch(done)

        builder.position_at_end(done)
        finals = [builder.phi(vtype), builder.phi(vtype)]
        for phi, via_tail, direct in zip(finals, tails, sums):
            phi.add_incoming(direct, after_loop)
            phi.add_incoming(via_tail, tail)
        return _horizontal_sum(builder, builder.fadd(*finals))

    return lane_type(chunk, k, ms, lo, hi), codegen
