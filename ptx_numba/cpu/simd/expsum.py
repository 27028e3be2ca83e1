"""The exp-sum hot loop of the CPU kernels, written once for any vector width.

LLVM's loop vectorizer cannot use a register-resident table (``vpermps``) and always spends a
subtraction on ``x - m``; this module writes the loop as LLVM vector IR (``numba.extending.intrinsic``),
13 vector operations per 8 float32 lanes instead of 17: ``sum_j 2**((x_j * K8 - S) / 8)``, with ``K8
= 8/ln 2`` (float32) and an integer ``S``:

1. ``x`` is clamped to ``[lo, hi]`` (two ``vmaxps``/``vminps``; NaN passes through).
2. ``s8 = fma(x, K8, MAGIC - S)`` rounds ``x*K8 - S`` to an integer ``k`` held in the low mantissa
   bits of ``s8`` (``MAGIC = 1.5 * 2**23 + 8*127`` also carries the exponent bias).
3. ``u = (MAGIC - S) - s8 = -S - k`` exactly, so ``r = fma(x, K8, u) = x*K8 - S - k`` with a single
   rounding; ``|r| <= 1/2``.
4. ``2**(k/8)``: ``k mod 8`` picks ``2**(j/8)`` from an 8-entry table in one register (``vpermps``)
   and ``k >> 3`` goes into the exponent field by one shift and one integer add.
5. ``2**(r/8) = 1 + q(r)``, ``q`` a degree-3 polynomial; the term is ``fma(scale, q, scale)``.

With ``m = S / K8`` (the row shift, float64) each term is ``exp(kappa * (x - m))``, ``kappa = K8 *
ln2 / 8 = 1 - 1.3e-8`` (less than the float32 rounding of ``x - m`` the portable loop incurs), to
within 1.5 ulp; exactly 0 below ``x - m = -88.03`` and for ``-inf``, at most ``3.3e38`` above
``hi``, NaN for NaN. ``S`` comes from :func:`.shift.shift_constants`. **float64** lanes sum ``2**(x_j
* K1 - S)``, ``K1 = 1/ln 2``: the same clamps and FMA range reduction (``MAGIC64 = 1.5 * 2**52 +
1023``), ``2**k`` from the shifted bits (no table), ``2**r`` by a degree-9 polynomial: ``exp(x -
m)`` to within 5e-14 relative, 0 below ``x - m = -709.1``, finite above ``+709.4``.

**Width** is a parameter (:class:`Plan`): 8 float32 lanes (``ymm``) or 16 (``zmm``); float64 has
half as many. The constants do not change: ``vpermps`` zmm indexes with the low 4 bits of ``s8``,
whose low bits are ``8*(n + 127) + j``, so the 16-entry table is the 8-entry one twice, and the walk
needs one set of constants for every loop. LLVM legalizes the width: a
``<16 x float>`` FMA becomes two ``ymm`` FMAs on an AVX2 target, so the 16-lane loops are compiled
and checked on any AVX2 machine. Only the table lookup has no width-generic spelling: the "avx512"
flavour calls ``llvm.x86.avx512.permvar.sf.512`` (one ``vpermps`` zmm), the "avx2" flavour
``llvm.x86.avx2.permps`` per 8 lanes. float16 is plain ``fpext half``, one per vector of the loop's
own width. That matters: a 16-element ``fpext`` in an 8-lane loop becomes ``vcvtph2psx zmm`` on an
AVX-512 target, and on Intel cores one 512-bit instruction in a loop takes port 1's vector units
away from all of its ``ymm`` work: float16 ran at half bfloat16's speed on a Sapphire-Rapids-class
Xeon that way (``bench/isa_ablation.py``: 0.38-0.42 against 0.28-0.34 ns/element in L1).
Loops: :data:`LOOPS`, each with a *moment* twin returning ``(sum term, sum term * (x*K - S))`` for
the entropy (:func:`make_expsum`). :mod:`.isa` plugs them into the row walk.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .shift import MAGIC, MAGIC64, constants, shift_limit  # noqa: F401  (re-exported)

#: Software prefetch distance (bytes) of each 64-byte line read: 4 KiB ahead cut [512, 128256]
#: float32 from 19.0 to 15.3 ms on one thread, float64 from 35.0 to 28.0 ms on two (Zen 3; 2 and 8
#: KiB no better). A compile-time constant: Numba's cache would not notice a runtime setting.
PREFETCH_BYTES = 4096

# Entry j: the bits of 2**(j/8) less what the shifted s8 bits add back (127 << 23, and j << 20).
_TABLE = [int(np.float32(2.0 ** (j / 8.0)).view(np.uint32)) - (127 << 23) - (j << 20) for j in range(8)]
# 2**(r/8) - 1 ~ r*(A1 + r*(A2 + r*A3)) on |r| <= 1/2, fitted for minimum relative error
# (Lawson iterations, then a search over neighbouring float32 values): fit error 2.7e-8 (0.45 ulp).
_A1 = 0.08664340525865555
_A2 = 0.003754026023671031
_A3 = 0.00010839102469617501

# 2**r ~ 1 + r*(C1 + ... + C9*r**8) on |r| <= 1/2: interpolated at 9 Chebyshev nodes, 3.7e-14
# relative. Degree 10 (5.8e-16) cost 12% more time per element; the float64 contract is 1e-10.
_C64 = (0.6931471805599453, 0.2402265069581299, 0.055504108664760424, 0.009618129159402558,
        0.0013333558179043112, 0.00015403455852453838, 1.525268684626772e-05, 1.3255224878668817e-06,
        1.0203121063391729e-07)

_F32, _F64 = ir.FloatType(), ir.DoubleType()
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)

#: Encodings read, with the stored bits that decode to -inf (the padding of a partial block).
_NEG_INF = {types.float32: -np.inf, types.float64: -np.inf, types.uint16: 0xFF80, types.int16: -1024}
#: Per encoding: LLVM element type, masked-load suffix, bytes per element.
_ELEMENT = {types.float32: (_F32, "f32", 4), types.float64: (_F64, "f64", 8), types.uint16: (_I16, "i16", 2),
            types.int16: (_I16, "i16", 2)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """One loop's shape.

    Attributes
    ----------
    lanes : int
        float32 lanes per vector, 8 (``ymm``) or 16 (``zmm``); float64 vectors have half as many.
    table : str
        ``"avx2"`` (``vpermps`` ymm per 8 lanes) or ``"avx512"`` (``vpermps`` zmm, 16 lanes only).
    moment : bool
        Also accumulate ``sum term * (x*K - S)``; the loop then returns a pair.
    step_bytes : dict
        Stored bytes per loop iteration, per numpy dtype name; every iteration prefetches each of
        its 64-byte lines ``PREFETCH_BYTES`` ahead unless the dtype is in ``no_prefetch``.
    no_prefetch : frozenset
        dtype names whose loop issues no software prefetch.
    """

    lanes: int
    table: str
    moment: bool = False
    step_bytes: tuple = ()
    no_prefetch: frozenset = frozenset()

    def bytes_for(self, dtype) -> int:
        default = 64 if self.lanes == 8 else 128
        return dict(self.step_bytes).get(str(np.dtype(str(dtype))), default)


# --- vector helpers, for any width ---------------------------------------------------------
def _vec(element, count):
    return ir.VectorType(element, count)


def _splat(value, vtype):
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


def _broadcast(builder, scalar, count):
    vtype = _vec(scalar.type, count)
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined), _splat(0, _vec(_I32, count)))


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _fma(builder, a, b, c):
    kind = "f64" if a.type.element == _F64 else "f32"
    return _call(builder, f"llvm.fma.v{a.type.count}{kind}", a.type, [a, b, c])


def _slice(builder, vec, start, count):
    return builder.shuffle_vector(vec, vec, ir.Constant(_vec(_I32, count), list(range(start, start + count))))


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))


def _clamp(builder, x, lo, hi):
    # "x < lo ? lo : x": NaN compares false and passes through (one vmaxps/vmaxpd each).
    x = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
    return builder.select(builder.fcmp_ordered(">", x, hi), hi, x)


def _lookup(builder, plan, bits):
    """``table[bits mod 8]`` for every lane (the only ISA-specific operation)."""
    lanes = bits.type.count
    vf = _vec(_F32, lanes)
    entries = [ir.Constant(_I32, _TABLE[j % 8]) for j in range(lanes)]
    table = builder.bitcast(ir.Constant(_vec(_I32, lanes), entries), vf)
    if lanes == 16 and plan.table == "avx512":
        return _call(builder, "llvm.x86.avx512.permvar.sf.512", vf, [table, bits])
    if lanes == 8:
        return _call(builder, "llvm.x86.avx2.permps", vf, [table, bits])
    # wider than ymm without AVX-512: one vpermps per 8-lane half
    t8 = _slice(builder, table, 0, 8)
    halves = [_call(builder, "llvm.x86.avx2.permps", _vec(_F32, 8), [t8, _slice(builder, bits, h, 8)])
              for h in range(0, lanes, 8)]
    while len(halves) > 1:
        halves = [_concat(builder, halves[i], halves[i + 1]) for i in range(0, len(halves), 2)]
    return halves[0]


def _term_f32(builder, plan, x, k8, ms, lo, hi):
    """``(term, clamped x)``: ``2**((x*K8 - S)/8)`` per float32 lane (steps 1-5 above)."""
    vf, vi = x.type, _vec(_I32, x.type.count)
    x = _clamp(builder, x, lo, hi)
    s8 = _fma(builder, x, k8, ms)
    r = _fma(builder, x, k8, builder.fsub(ms, s8))
    bits = builder.bitcast(s8, vi)
    entry = builder.bitcast(_lookup(builder, plan, bits), vi)
    scale = builder.bitcast(builder.add(entry, builder.shl(bits, _splat(20, vi))), vf)
    q = _fma(builder, _fma(builder, _splat(_A3, vf), r, _splat(_A2, vf)), r, _splat(_A1, vf))
    # Not fma(scale, fma(q, r, 1), acc), one op fewer: rounding 1 + q*r costs another 0.5 ulp
    # (1.81 ulp measured against 1.5) for 5-10% on an L1-resident chunk.
    return _fma(builder, scale, builder.fmul(q, r), scale), x


def _term_f64(builder, plan, x, k1, ms, lo, hi):
    """``((scale, p), clamped x)``: ``2**(x*K1 - S) = scale * p`` per float64 lane (degree 9).

    The product is left to the caller, which folds it into the accumulating FMA (float64 lanes
    leave ~1e-16 of rounding to spare) unless it needs the term itself.
    """
    vd, vq = x.type, _vec(_I64, x.type.count)
    x = _clamp(builder, x, lo, hi)
    s = _fma(builder, x, k1, ms)
    r = _fma(builder, x, k1, builder.fsub(ms, s))
    scale = builder.bitcast(builder.shl(builder.bitcast(s, vq), _splat(52, vq)), vd)
    # 2**r = E(r*r) + r*O(r*r): two Horner chains of 4 FMAs side by side. One chain of 9
    # dependent FMAs (36 cycles) kept too few blocks in flight for the scheduler to overlap.
    r2 = builder.fmul(r, r)
    coeffs = (1.0,) + _C64
    even = _splat(coeffs[8], vd)
    for c in coeffs[6::-2]:
        even = _fma(builder, even, r2, _splat(c, vd))
    odd = _splat(coeffs[9], vd)
    for c in coeffs[7::-2]:
        odd = _fma(builder, odd, r2, _splat(c, vd))
    return (scale, _fma(builder, odd, r, even)), x


def _decode(builder, raw, dtype, lanes):
    """Vectors of ``lanes`` compute lanes from one loaded block (lane order is irrelevant to a sum)."""
    n = raw.type.count
    if dtype in (types.float32, types.float64):
        return [_slice(builder, raw, i, lanes) for i in range(0, n, lanes)]
    if dtype == types.uint16:
        # bfloat16 -> float32 is "bits << 16": interleaving 2*lanes words with zero words inside
        # each 128-bit lane gives two vectors per vpunpck{l,h}wd pair.
        out = []
        zero = ir.Constant(_vec(_I16, 2 * lanes), None)
        for start in range(0, n, 2 * lanes):
            words = _slice(builder, raw, start, 2 * lanes)
            for half in (0, 4):
                idx = [i for g in range(0, 2 * lanes, 8) for w in range(half, half + 4) for i in (2 * lanes, g + w)]
                mixed = builder.shuffle_vector(words, zero, ir.Constant(_vec(_I32, 2 * lanes), idx))
                out.append(builder.bitcast(mixed, _vec(_F32, lanes)))
        return out
    # float16: one fpext (vcvtph2ps ymm/zmm from memory) per vector, no extract afterwards
    half = _vec(ir.HalfType(), lanes)
    return [builder.fpext(builder.bitcast(_slice(builder, raw, i, lanes), half), _vec(_F32, lanes))
            for i in range(0, n, lanes)]


def _block_pointer(builder, data, index, dtype, step):
    element = _ELEMENT[dtype][0]
    base = builder.bitcast(data, ir.PointerType(element))
    return builder.bitcast(builder.gep(base, [index]), ir.PointerType(_vec(element, step)))


def _load_tail(builder, data, start, count, dtype, step):
    """The last ``count < step`` elements from ``start``, padded with the encoding of -inf."""
    ptr = _block_pointer(builder, data, start, dtype, step)
    block = ptr.type.pointee
    lanes = ir.Constant(_vec(_I32, step), list(range(step)))
    limit = _broadcast(builder, builder.trunc(count, _I32), step)
    mask = builder.icmp_signed("<", lanes, limit)
    pad = ir.Constant(block, [ir.Constant(block.element, _NEG_INF[dtype])] * step)
    name = f"llvm.masked.load.v{step}{_ELEMENT[dtype][1]}.p0"
    return _call(builder, name, block, [ptr, ir.Constant(_I32, _ELEMENT[dtype][2]), mask, pad])


def _prefetch(builder, ptr, offset):
    """``prefetcht0`` of the line ``PREFETCH_BYTES + offset`` bytes past ``ptr`` (never faults)."""
    ahead = builder.gep(builder.bitcast(ptr, ir.PointerType(ir.IntType(8))),
                        [ir.Constant(_I64, PREFETCH_BYTES + offset)])
    args = [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]  # read, keep, data
    _call(builder, "llvm.prefetch.p0", ir.VoidType(), args)


def _horizontal_sum(builder, vec):
    """Sum of the lanes by halving (log2(lanes) shuffles and adds)."""
    while vec.type.count > 1:
        half = vec.type.count // 2
        vec = builder.fadd(_slice(builder, vec, 0, half), _slice(builder, vec, half, half))
    return builder.extract_element(vec, ir.Constant(_I32, 0))


# --- the loop ------------------------------------------------------------------------------
def _accumulate(builder, plan, term_fn, accs, xs, consts, neg_s):
    """Add every vector of ``xs`` into the accumulators in turn (two, or two pairs with moments)."""
    accs = list(accs)
    n_acc = 2
    for i, x in enumerate(xs):
        term, xc = term_fn(builder, plan, x, *consts)
        a = i % n_acc
        if isinstance(term, tuple):  # float64: scale * p
            if not plan.moment:
                accs[a] = _fma(builder, term[0], term[1], accs[a])
                continue
            term = builder.fmul(term[0], term[1])
        accs[a] = builder.fadd(accs[a], term)
        if plan.moment:
            d = _fma(builder, xc, consts[0], neg_s)
            accs[n_acc + a] = _fma(builder, term, d, accs[n_acc + a])
    return accs


def _codegen_for(plan, dtype):
    lane_f64 = dtype == types.float64
    lanes = plan.lanes // 2 if lane_f64 else plan.lanes
    vtype = _vec(_F64 if lane_f64 else _F32, lanes)
    itemsize = _ELEMENT[dtype][2]
    step = plan.bytes_for(dtype) // itemsize
    prefetch = str(np.dtype(str(dtype))) not in plan.no_prefetch
    term_fn = _term_f64 if lane_f64 else _term_f32
    magic = MAGIC64 if lane_f64 else MAGIC
    n_accs = 4 if plan.moment else 2

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        n = builder.extract_value(array.shape, 0)
        consts = [_broadcast(builder, value, lanes) for value in args[1:]]
        # -S = ms - MAGIC, exact: both are integers below 2**24 (2**53 for float64)
        neg_s = builder.fsub(consts[1], _splat(magic, vtype))
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
        accs = [builder.phi(vtype) for _ in range(n_accs)]
        ptr = _block_pointer(builder, array.data, builder.mul(index, ir.Constant(_I64, step)), dtype, step)
        raw = builder.load(ptr, align=itemsize)
        if prefetch:
            for offset in range(0, step * itemsize, 64):
                _prefetch(builder, ptr, offset)
        new = _accumulate(builder, plan, term_fn, accs, _decode(builder, raw, dtype, lanes), consts, neg_s)
        next_index = builder.add(index, ir.Constant(_I64, 1))
        builder.cbranch(builder.icmp_signed("<", next_index, n_full), loop, after_loop)
        index.add_incoming(ir.Constant(_I64, 0), entry)
        index.add_incoming(next_index, loop)
        for phi, value in zip(accs, new):
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, loop)

        builder.position_at_end(after_loop)
        sums = [builder.phi(vtype) for _ in range(n_accs)]
        for phi, value in zip(sums, new):
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed(">", remainder, ir.Constant(_I64, 0)), tail, done)

        builder.position_at_end(tail)
        raw = _load_tail(builder, array.data, builder.mul(n_full, ir.Constant(_I64, step)), remainder, dtype, step)
        tails = _accumulate(builder, plan, term_fn, sums, _decode(builder, raw, dtype, lanes), consts, neg_s)
        builder.branch(done)

        builder.position_at_end(done)
        finals = [builder.phi(vtype) for _ in range(n_accs)]
        for phi, via_tail, direct in zip(finals, tails, sums):
            phi.add_incoming(direct, after_loop)
            phi.add_incoming(via_tail, tail)
        total = _horizontal_sum(builder, builder.fadd(finals[0], finals[1]))
        if not plan.moment:
            return total
        moment = _horizontal_sum(builder, builder.fadd(finals[2], finals[3]))
        return context.make_tuple(builder, signature.return_type, [total, moment])

    return codegen


def make_expsum(plan: Plan, name: str):
    """A Numba intrinsic ``name(chunk, k, ms, lo, hi)`` running the loop ``plan`` describes.

    Parameters
    ----------
    plan : Plan
        Width, table flavour, moment accumulation and loop step.
    name : str
        The intrinsic's name (distinct per plan, for Numba's typing and caches).

    Returns
    -------
    intrinsic
        Numba-only. ``chunk``: 1-D C-contiguous float32 / uint16 (bfloat16 bits) / int16 (float16
        bits) array with float32 ``k, ms, lo, hi``, or float64 with float64 ones, from
        ``constants(shift)``. Returns ``sum_j term_j`` in the lane type, or with ``plan.moment``
        the pair ``(sum_j term_j, sum_j term_j * (x_j*k - S))`` (``S = MAGIC - ms``; ``x_j``
        clamped to ``[lo, hi]``, so -inf entries add exactly 0 to both). With ``m, corr`` from
        the same ``constants`` call, ``corr * s`` is ``sum exp(x - m)`` and ``t / (k * s) +
        (S/k - m)`` is the mean of ``x - m`` under those weights (natural units).
    """

    def typer(typingctx, chunk, k, ms, lo, hi):
        if not (isinstance(chunk, types.Array) and chunk.ndim == 1 and chunk.layout == "C"
                and chunk.dtype in _NEG_INF):
            return None
        lane_type = types.float64 if chunk.dtype == types.float64 else types.float32
        if not all(arg == lane_type for arg in (k, ms, lo, hi)):
            return None
        ret = types.UniTuple(lane_type, 2) if plan.moment else lane_type
        return ret(chunk, k, ms, lo, hi), _codegen_for(plan, chunk.dtype)

    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


#: The loop flavours: ``(lanes, table)``; "avx512" needs the AVX-512 target of :mod:`.features`.
#: Each iteration reads 64 bytes per 8 lanes with a prefetch per line, except "avx2_8"'s float16
#: (16 elements, no prefetch): 0.3-0.5 ms faster on Zen 3 at [512, 128256] on 2 threads, where
#: bfloat16 gained from 32 elements and prefetches (7.25-7.5 against 7.9-8.0 ms, min of 40 calls).
LOOPS = {"avx2_8": Plan(8, "avx2", step_bytes=(("int16", 32),), no_prefetch=frozenset({"int16"})),
         "avx2_8_f16fix": Plan(8, "avx2"),
         "avx2_16": Plan(16, "avx2"),
         "avx512_16": Plan(16, "avx512")}

#: 8 lanes: the AVX2 loop (float16: 16 elements per iteration, no prefetch, widened per 8 lanes).
expsum_avx2 = make_expsum(LOOPS["avx2_8"], "expsum_avx2")
#: 8 lanes with float16 read like the others: 64 bytes per iteration, one prefetch per line.
expsum_avx2_f16fix = make_expsum(LOOPS["avx2_8_f16fix"], "expsum_avx2_f16fix")
#: 16 lanes on AVX2 instructions (the width legalized into ymm halves): runs on any AVX2 host.
expsum_avx2_16 = make_expsum(LOOPS["avx2_16"], "expsum_avx2_16")
#: 16 lanes with the zmm table lookup: AVX-512 targets only.
expsum_avx512 = make_expsum(LOOPS["avx512_16"], "expsum_avx512")

#: Moment twins: ``(s, t)`` with ``t = sum term * (x*K - S)``.
expsum_moment_avx2 = make_expsum(dataclasses.replace(LOOPS["avx2_8"], moment=True), "expsum_moment_avx2")
expsum_moment_avx2_16 = make_expsum(dataclasses.replace(LOOPS["avx2_16"], moment=True), "expsum_moment_avx2_16")
expsum_moment_avx512 = make_expsum(dataclasses.replace(LOOPS["avx512_16"], moment=True), "expsum_moment_avx512")

#: The loop (and its moment twin) per ISA of :func:`.features.choose` ("portable" has none: the
#: walk keeps its LLVM-vectorized loop); each takes the constants of ``constants(shift)``.
LOOP_FOR_ISA = {"avx512": expsum_avx512, "avx2": expsum_avx2}
MOMENT_FOR_ISA = {"avx512": expsum_moment_avx512, "avx2": expsum_moment_avx2}
