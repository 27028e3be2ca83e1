"""Hand-written gradient loop for the common rows of the gradient pass (float32 lanes, AVX2).

``out_j = encode(d + (term_j > 0 ? term_j * a : 0))`` over a whole row, where ``term_j =
2**((x_j*K8 - S)/8)`` is the exp-sum loops' term (:mod:`.expsum`, same constants from
:func:`.shift.shift_constants`) and ``a``, ``d`` fold the row's ``A / s``, the shift
correction and ``D`` (see :func:`ptx_numba.cpu.backward.grad_kernel`). It serves rows with no
``B``/``E`` term, no temperature and no softcap (cross entropy, z-loss, label smoothing): per
8 lanes 15 vector operations instead of the portable loop's ~30, and one pass that stores
straight into ``out`` (each block is loaded before it is stored, so ``out`` may be ``x``).

Reads float32, bfloat16 (uint16 bits) and float16 (int16 bits; F16C) rows; writes float32,
bfloat16 bits or float16 bits, rounded from float32 to nearest even (NaN stays a quiet NaN).
The last partial block is read with a masked load padded with -inf (its terms are 0) and written
with a masked store, so nothing outside the row is touched. Lanes keep their element order.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .expsum import Plan, _block_pointer, _broadcast, _call, _concat, _fma, _load_tail, _prefetch, _slice, _term_f32

_F32 = ir.FloatType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_LANES = 8
_STEP = 16  # elements per iteration: two vectors in flight
_PLAN = Plan(_LANES, "avx2")
_IN = (types.float32, types.uint16, types.int16)
_OUT = {types.float32: (_F32, "f32", 4), types.uint16: (_I16, "i16", 2), types.int16: (_I16, "i16", 2)}


def _vec(element, count):
    return ir.VectorType(element, count)


def _splat(value, vtype):
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


def _decode_ordered(builder, raw, dtype):
    """float32 vectors of ``_LANES`` lanes, in element order."""
    n = raw.type.count
    if dtype == types.float32:
        vals = raw
    elif dtype == types.uint16:  # bfloat16: bits << 16
        wide = builder.zext(raw, _vec(_I32, n))
        vals = builder.bitcast(builder.shl(wide, _splat(16, _vec(_I32, n))), _vec(_F32, n))
    else:  # float16: vcvtph2ps
        vals = builder.fpext(builder.bitcast(raw, _vec(ir.HalfType(), n)), _vec(_F32, n))
    return [_slice(builder, vals, i, _LANES) for i in range(0, n, _LANES)]


def _encode(builder, g, out_dtype):
    """A float32 vector in ``out``'s encoding (round to nearest even from float32)."""
    n = g.type.count
    if out_dtype == types.float32:
        return g
    if out_dtype == types.int16:
        return builder.bitcast(builder.fptrunc(g, _vec(ir.HalfType(), n)), _vec(_I16, n))
    vi = _vec(_I32, n)
    bits = builder.bitcast(g, vi)
    high = builder.lshr(bits, _splat(16, vi))
    odd = builder.and_(high, _splat(1, vi))
    rounded = builder.lshr(builder.add(builder.add(bits, _splat(0x7FFF, vi)), odd), _splat(16, vi))
    quiet = builder.or_(high, _splat(0x40, vi))
    chosen = builder.select(builder.fcmp_unordered("uno", g, g), quiet, rounded)
    return builder.trunc(chosen, _vec(_I16, n))


def _gradient(builder, xs, consts, out_dtype):
    """The encoded gradient of one block (a vector of ``_STEP`` out elements)."""
    k8, ms, lo, hi, a, d = consts
    zero = ir.Constant(a.type, None)
    parts = []
    for x in xs:
        term, _ = _term_f32(builder, _PLAN, x, k8, ms, lo, hi)
        g = builder.select(builder.fcmp_ordered(">", term, zero), _fma(builder, term, a, d), d)
        parts.append(_encode(builder, g, out_dtype))
    while len(parts) > 1:
        parts = [_concat(builder, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def _out_pointer(builder, data, index, out_dtype):
    element = _OUT[out_dtype][0]
    base = builder.bitcast(data, ir.PointerType(element))
    return builder.bitcast(builder.gep(base, [index]), ir.PointerType(_vec(element, _STEP)))


def _codegen(in_dtype, out_dtype):
    in_size = {types.float32: 4, types.uint16: 2, types.int16: 2}[in_dtype]
    out_size = _OUT[out_dtype][2]

    def codegen(context, builder, signature, args):
        x = context.make_array(signature.args[0])(context, builder, args[0])
        out = context.make_array(signature.args[1])(context, builder, args[1])
        n = builder.extract_value(x.shape, 0)
        consts = [_broadcast(builder, value, _LANES) for value in args[2:]]
        step = ir.Constant(_I64, _STEP)
        n_full = builder.sdiv(n, step)
        remainder = builder.sub(n, builder.mul(n_full, step))

        entry = builder.block
        loop = builder.append_basic_block("grad.loop")
        after = builder.append_basic_block("grad.after")
        tail = builder.append_basic_block("grad.tail")
        done = builder.append_basic_block("grad.done")
        builder.cbranch(builder.icmp_signed(">", n_full, ir.Constant(_I64, 0)), loop, after)

        builder.position_at_end(loop)
        index = builder.phi(_I64)
        start = builder.mul(index, step)
        ptr = _block_pointer(builder, x.data, start, in_dtype, _STEP)
        raw = builder.load(ptr, align=in_size)
        for offset in range(0, _STEP * in_size, 64):
            _prefetch(builder, ptr, offset)
        value = _gradient(builder, _decode_ordered(builder, raw, in_dtype), consts, out_dtype)
        builder.store(value, _out_pointer(builder, out.data, start, out_dtype), align=out_size)
        next_index = builder.add(index, ir.Constant(_I64, 1))
        index.add_incoming(ir.Constant(_I64, 0), entry)
        index.add_incoming(next_index, loop)
        builder.cbranch(builder.icmp_signed("<", next_index, n_full), loop, after)

        builder.position_at_end(after)
        builder.cbranch(builder.icmp_signed(">", remainder, ir.Constant(_I64, 0)), tail, done)

        builder.position_at_end(tail)
        start = builder.mul(n_full, step)
        raw = _load_tail(builder, x.data, start, remainder, in_dtype, _STEP)
        value = _gradient(builder, _decode_ordered(builder, raw, in_dtype), consts, out_dtype)
        lanes = ir.Constant(_vec(_I32, _STEP), list(range(_STEP)))
        mask = builder.icmp_signed("<", lanes, _broadcast(builder, builder.trunc(remainder, _I32), _STEP))
        name = f"llvm.masked.store.v{_STEP}{_OUT[out_dtype][1]}.p0"
        _call(builder, name, ir.VoidType(),
              [value, _out_pointer(builder, out.data, start, out_dtype), ir.Constant(_I32, out_size), mask])
        builder.branch(done)

        builder.position_at_end(done)
        return context.get_dummy_value()

    return codegen


@intrinsic
def grad_row(typingctx, x, out, k8, ms, lo, hi, a, d):
    """``out[j] = encode(d + (term_j > 0 ? term_j * a : 0))`` for a whole row (Numba-only).

    ``x``: 1-D C-contiguous float32 / uint16 (bfloat16 bits) / int16 (float16 bits); ``out``:
    1-D C-contiguous float32 / uint16 / int16 of at least ``x.size`` elements (may be ``x``'s
    memory); ``k8, ms, lo, hi`` float32 from :func:`.shift.shift_constants`; ``a, d`` float32.
    """
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C" and x.dtype in _IN):
        return None
    if not (isinstance(out, types.Array) and out.ndim == 1 and out.layout == "C" and out.dtype in _OUT):
        return None
    if not all(arg == types.float32 for arg in (k8, ms, lo, hi, a, d)):
        return None
    return types.none(x, out, k8, ms, lo, hi, a, d), _codegen(x.dtype, out.dtype)
