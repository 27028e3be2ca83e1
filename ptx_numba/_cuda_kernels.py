"""numba.cuda kernels for the ``cuda`` backend (imported lazily by :mod:`ptx_numba.gpu`).

One kernel computes, per row ``i`` of an ``[N, V]`` (or strided ``[B, T, V]``) logits array,
``lse_i = log(sum_j exp(z_ij))`` and, when labels are given, ``ce_i = lse_i - z_i[y_i]``:

* **row per block**: the threads of a block stride over one row (stride ``blockDim``), each keeping
  an online ``(m, s)`` pair: the running max and ``sum exp(z - m)``. Four elements are loaded per
  step so that several loads are in flight per thread (the kernel is bound by memory bandwidth).
  ``m`` and ``s`` are float32 for float32/float16/bfloat16 input and float64 for float64 input;
  every constant in the loop is of that type so no float64 arithmetic sneaks into the float32 path.
* **block reduction** of the ``(m, s)`` pairs: warp shuffles on a real GPU, or a shared-memory tree
  (the CUDA simulator has no shuffles).
* **fused label gather and finish** in thread 0, in float64: ``ce = log(s) - (z_y - m)``, which
  avoids the cancellation in ``lse - z_y`` when logits carry large offsets.
* **grid-stride over rows** with a capped grid; each block adds its rows' CE into a float64 block
  total and makes one atomic add per block into ``totals = [sum, count]``.

Special values follow :mod:`ptx_numba.reference`: a row of all ``-inf`` gives ``lse = -inf``; a
``+inf`` entry gives ``+inf``; NaN propagates. The loop is written so that no ``inf - inf`` is ever
evaluated (NaN comes only from NaN input), which also keeps the simulator free of NumPy warnings.

Kernels are built on first use by :func:`get_kernel`, one per
``(encoding, ndim, threads_per_block, use_shuffle)``; Numba compiles each for the argument types of
its first launch.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda  # the simulator swaps this module-level name for its fake module

try:  # libdevice exists only on the real target
    from numba.cuda import libdevice
except ImportError:  # pragma: no cover - simulator
    libdevice = None

#: Encodings the kernels understand: device array dtype -> accumulator precision.
ENCODINGS = ("f32", "f64", "f16", "bf16")

_WARP = 32
_FULL_MASK = 0xFFFFFFFF

_cache: dict[tuple, object] = {}


def on_simulator() -> bool:
    """True when numba.cuda is Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(getattr(numba.config, "ENABLE_CUDASIM", 0)) or "simulator" in getattr(
        cuda.to_device, "__module__", ""
    )


# ------------------------------------------------------------------------------------------------
# element loader: (x, r0, r1, j) -> z[row, j] in the accumulator type, with r0 = row // T and
# r1 = row % T for [B, T, V] input (r1 unused for [N, V]). Device functions cannot return views,
# so the loader indexes the array itself; offsets are computed in int64 by Numba.
# ------------------------------------------------------------------------------------------------
def _make_loader(encoding: str, ndim: int, acc):
    if encoding == "bf16" and on_simulator():
        # The simulator runs Python: widen the bits and reinterpret them with NumPy.
        def bf16_sim(bits):
            return (np.uint32(bits) << np.uint32(16)).view(np.float32)

        convert = cuda.jit(device=True)(bf16_sim)
    elif encoding == "bf16":

        def bf16(bits):
            # bfloat16 is the top half of a float32: widen the bits and reinterpret them.
            return libdevice.int_as_float(numba.int32(numba.uint32(bits) << numba.uint32(16)))

        convert = cuda.jit(device=True)(bf16)
    else:

        def widen(v):
            return acc(v)  # float16 -> float32; a no-op for float32 and float64

        convert = cuda.jit(device=True)(widen)

    if ndim == 2:

        def load2(x, r0, r1, j):
            return convert(x[r0, j])

        return cuda.jit(device=True)(load2)

    def load3(x, r0, r1, j):
        return convert(x[r0, r1, j])

    return cuda.jit(device=True)(load3)


# ------------------------------------------------------------------------------------------------
# the kernel factory
# ------------------------------------------------------------------------------------------------
def get_kernel(encoding: str, ndim: int, tpb: int, use_shuffle: bool):
    """The kernel for one configuration, built on first request and cached."""
    key = (encoding, ndim, tpb, use_shuffle)
    kernel = _cache.get(key)
    if kernel is None:
        kernel = _build(encoding, ndim, tpb, use_shuffle)
        _cache[key] = kernel
    return kernel


def _build(encoding: str, ndim: int, tpb: int, use_shuffle: bool):
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    acc = numba.float64 if encoding == "f64" else numba.float32
    # Typed constants: a bare 0.0 or math.inf would be float64 and promote the float32 path.
    ZERO = acc(0.0)
    NEG_INF = acc(-math.inf)
    POS_INF = acc(math.inf)
    NAN = acc(math.nan)
    F64_NAN = numba.float64(math.nan)
    F64_INF = numba.float64(math.inf)
    TPB = tpb
    NWARPS = tpb // _WARP
    HALF = 1 << max(0, (tpb - 1).bit_length() - 1)  # half of next_pow2(tpb): the first tree stride

    load = _make_loader(encoding, ndim, acc)

    @cuda.jit(device=True)
    def combine(m1, s1, m2, s2):
        # Merge two (max, sum exp(z - max)) pairs. Equal maxima (including two infinities) are
        # merged without subtracting them, so inf - inf never occurs; NaN in s stays NaN.
        if m2 > m1:
            return m2, s1 * acc(math.exp(m1 - m2)) + s2
        if m2 == m1:
            return m1, s1 + s2
        return m1, s1 + s2 * acc(math.exp(m2 - m1))

    @cuda.jit(device=True)
    def tree_reduce(sm, ss, tid, m, s):
        sm[tid] = m
        ss[tid] = s
        cuda.syncthreads()
        stride = HALF
        while stride > 0:
            if tid < stride and tid + stride < TPB:
                mm, sv = combine(sm[tid], ss[tid], sm[tid + stride], ss[tid + stride])
                sm[tid] = mm
                ss[tid] = sv
            cuda.syncthreads()
            stride //= 2
        return sm[0], ss[0]

    @cuda.jit(device=True)
    def warp_reduce(m, s):
        offset = _WARP // 2
        while offset > 0:
            m2 = cuda.shfl_down_sync(_FULL_MASK, m, offset)
            s2 = cuda.shfl_down_sync(_FULL_MASK, s, offset)
            m, s = combine(m, s, m2, s2)
            offset //= 2
        return m, s

    @cuda.jit(device=True)
    def shuffle_reduce(sm, ss, tid, m, s):
        # Result valid in thread 0 only.
        lane = tid % _WARP
        warp = tid // _WARP
        m, s = warp_reduce(m, s)
        if lane == 0:
            sm[warp] = m
            ss[warp] = s
        cuda.syncthreads()
        if warp == 0:  # whole warp 0 takes this branch, so the full shuffle mask is right
            if lane < NWARPS:
                m = sm[lane]
                s = ss[lane]
            else:
                m = NEG_INF
                s = ZERO
            m, s = warp_reduce(m, s)
        return m, s

    block_reduce = shuffle_reduce if use_shuffle else tree_reduce

    @cuda.jit(device=True)
    def max2(a, b):
        return b if b > a else a

    @cuda.jit
    def row_kernel(x, inner, labels, ignore_index, has_labels, out, write_rows, totals, nrows):
        # x: [N, V] or [B, T, V] (inner = T), any strides. labels: int64 [N] (unused unless
        # has_labels). out: [N] per-row lse or ce (written when write_rows). totals: float64 [2].
        sm = cuda.shared.array(TPB, acc)
        ss = cuda.shared.array(TPB, acc)
        tid = cuda.threadIdx.x
        vocab = x.shape[ndim - 1]
        step4 = 4 * TPB
        block_sum = numba.float64(0.0)
        block_count = numba.float64(0.0)
        row = numba.int64(cuda.blockIdx.x)  # int64: row offsets exceed 2**31 for big batches
        while row < nrows:
            y = labels[row] if has_labels else numba.int64(0)
            ignored = has_labels and y == ignore_index
            # Ignored rows still run the (empty) reduction, so every thread reaches every barrier.
            limit = 0 if ignored else vocab
            r0 = row // inner
            r1 = row - r0 * inner
            m = NEG_INF
            s = ZERO
            seen_nan = False
            j = tid
            while j < limit:
                j1 = j + TPB
                j2 = j1 + TPB
                j3 = j2 + TPB
                v0 = load(x, r0, r1, j)
                v1 = load(x, r0, r1, j1) if j1 < limit else NEG_INF
                v2 = load(x, r0, r1, j2) if j2 < limit else NEG_INF
                v3 = load(x, r0, r1, j3) if j3 < limit else NEG_INF
                if v0 != v0 or v1 != v1 or v2 != v2 or v3 != v3:
                    seen_nan = True  # the row's result is NaN; nothing more to learn here
                    break
                mloc = max2(max2(v0, v1), max2(v2, v3))
                if mloc > m:
                    s = s * acc(math.exp(m - mloc))  # m = -inf gives exp(-inf) = 0, not NaN
                    m = mloc
                # Only a finite max needs the sum: all -inf so far adds nothing, and after +inf
                # the result is +inf whatever s is (unless NaN turns up, which is checked above).
                if m > NEG_INF and m < POS_INF:
                    s += (acc(math.exp(v0 - m)) + acc(math.exp(v1 - m))) + (
                        acc(math.exp(v2 - m)) + acc(math.exp(v3 - m))
                    )
                j += step4
            if seen_nan:
                s = NAN
            m, s = block_reduce(sm, ss, tid, m, s)
            if tid == 0:
                if ignored:
                    val = numba.float64(0.0)
                else:
                    m64 = numba.float64(m)
                    s64 = numba.float64(s)
                    if s64 != s64:
                        lse = F64_NAN
                        ce = F64_NAN
                    elif m64 == F64_INF:
                        lse = F64_INF
                        ce = F64_INF
                        if has_labels and numba.float64(load(x, r0, r1, y)) == F64_INF:
                            ce = F64_NAN  # inf - inf, as the reference
                    elif m64 == -F64_INF:
                        lse = -F64_INF
                        ce = F64_NAN  # -inf - -inf, as the reference
                    else:
                        log_s = math.log(s64)
                        lse = m64 + log_s
                        ce = F64_NAN
                        if has_labels:
                            ce = log_s - (numba.float64(load(x, r0, r1, y)) - m64)
                    if has_labels:
                        val = ce
                        block_sum += ce
                        block_count += 1.0
                    else:
                        val = lse
                if write_rows:
                    out[row] = val
            cuda.syncthreads()  # shared memory is reused by the next row
            row += cuda.gridDim.x
        if tid == 0 and has_labels:
            cuda.atomic.add(totals, 0, block_sum)
            cuda.atomic.add(totals, 1, block_count)

    return row_kernel
