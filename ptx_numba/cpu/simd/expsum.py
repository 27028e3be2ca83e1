"""The exp-sum hot loop, written once for any vector width: 8 or 16 float32 lanes (4 or 8 float64).

Each loop computes exactly what the AVX2 loop does (same numerics, same constants, same call):
``sum_j 2**((x_j*K8 - S)/8)`` on float32 lanes for float32, bfloat16 (uint16 bits) and float16
(int16 bits) chunks, ``sum_j 2**(x_j*K1 - S)`` on float64 lanes for float64 chunks, with ``k, ms,
lo, hi`` from ``constants(shift)`` of the shift module. The operations per vector are the same as
in the AVX2 loop (clamp, FMA range reduction, ``2**(k/8)`` by a table and an exponent shift, degree-3
polynomial; degree 9 and no table for float64); only the width changes. The constants do not:

* The 16-lane table is the 8-entry table twice. ``vpermps`` zmm indexes with the low 4 bits of
  ``s8``, whose low bits are ``8*(n + 127) + j`` (``j = k mod 8``), so index ``8b + j`` must hold
  what index ``j`` holds: the same ``2**(j/8)`` less the bits the shift adds back. ``K8``,
  ``MAGIC``, the clamps, ``S_LIMIT`` and ``corr`` are unchanged, so the walk needs no second set.
  (A 16-step table, ``K16 = 16/ln 2``, was considered: it halves ``r`` but degree 2 would still
  be 4e-7 relative, over 3 ulp, so it saves no operation.)

The width is the only thing LLVM must legalize: a ``<16 x float>`` FMA becomes two ``ymm`` FMAs
on an AVX2 target, so the 16-lane loops are compiled and checked on any x86-64 machine with AVX2.
Only the table lookup has no width-generic spelling (IR has no variable shuffle): the "avx512"
flavour calls ``llvm.x86.avx512.permvar.sf.512`` (one ``vpermps`` zmm), the "avx2" flavour of
the 16-lane loop does two ``llvm.x86.avx2.permps`` on the halves. ``vcvtph2ps`` (float16) is plain
``fpext half`` in the IR, one per vector of the loop's own width. That matters: the AVX2 loop's
16-element ``fpext`` becomes ``vcvtph2psx zmm`` + ``vextractf64x4`` on an AVX-512 target, and on
Intel cores one 512-bit instruction in a loop takes port 1's vector units away from all of its
``ymm`` work, which is why float16 ran at half bfloat16's speed on a Sapphire-Rapids-class Xeon
(``bench/isa_ablation.py``: 0.38-0.42 against 0.28-0.34 ns/element in L1, and past L3 from 30%
to 46% of the read floor with the 64-byte step and prefetch of the other encodings).

Loops per flavour (:data:`LOOPS`): ``(lanes, table)`` in ``(8, "avx2")``, ``(16, "avx2")``,
``(16, "avx512")``; each also has a *moment* twin returning ``(sum_j term_j, sum_j term_j * d_j)``
with ``d_j = x_j*K - S`` (``x_j`` clamped, one FMA), for the entropy ``H = log s - t/s`` in units
of ``1/K`` (see :func:`make_expsum`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# --- what this module takes from the AVX2 loop and its shift arithmetic (one place, renamed at
# --- the cpu/simd merge: ._avx2 -> .avx2, ._shift -> .shift)
from .avx2 import _A1, _A2, _A3, _C64, _TABLE, PREFETCH_BYTES
from .shift import MAGIC, MAGIC64, constants, shift_limit  # noqa: F401  (re-exported)

_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)

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
    """``(term, clamped x)``: ``2**((x*K8 - S)/8)`` per float32 lane (see the AVX2 loop)."""
    vf, vi = x.type, _vec(_I32, x.type.count)
    x = _clamp(builder, x, lo, hi)
    s8 = _fma(builder, x, k8, ms)
    r = _fma(builder, x, k8, builder.fsub(ms, s8))
    bits = builder.bitcast(s8, vi)
    entry = builder.bitcast(_lookup(builder, plan, bits), vi)
    scale = builder.bitcast(builder.add(entry, builder.shl(bits, _splat(20, vi))), vf)
    q = _fma(builder, _fma(builder, _splat(_A3, vf), r, _splat(_A2, vf)), r, _splat(_A1, vf))
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
    # 2**r = E(r*r) + r*O(r*r): two Horner chains side by side (one chain of 9 FMAs kept too few
    # blocks in flight, measured with the AVX2 loop)
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


#: The loop flavours: ``(lanes, table)``; "avx512" needs :mod:`.isa`'s "avx512" target.
LOOPS = {"avx2_8": Plan(8, "avx2", step_bytes=(("int16", 32),), no_prefetch=frozenset({"int16"})),
         "avx2_8_f16fix": Plan(8, "avx2"),
         "avx2_16": Plan(16, "avx2"),
         "avx512_16": Plan(16, "avx512")}

#: 8 lanes, every step and prefetch as in the AVX2 loop (float16: 16 elements, no prefetch).
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

#: The loop (and its moment twin) per ISA of :func:`.isa.choose`; "portable" has none (the walk
#: keeps its LLVM-vectorized loop). Every entry takes the constants of ``constants(shift)``.
#: "avx2" keeps the AVX2 loop's steps, tuned on Zen 3 (float16: 16 elements, no prefetch, which
#: measured faster there); ``expsum_avx2_f16fix`` was faster past L3 on the Xeon, where the
#: "avx512" loop runs instead.
LOOP_FOR_ISA = {"avx512": expsum_avx512, "avx2": expsum_avx2}
MOMENT_FOR_ISA = {"avx512": expsum_moment_avx512, "avx2": expsum_moment_avx2}
