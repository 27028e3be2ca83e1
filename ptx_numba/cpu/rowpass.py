"""The CPU row pass: one streaming walk per row piece, the fast loops plugged in by ISA marker.

The story of one row ``z`` (length V):

1. The row is cut into *pieces* (the whole row when there are enough rows to keep every thread
   busy; otherwise a few vocabulary segments per row, so N = 1..4 still uses every core).
2. Each piece is walked in L1-sized *chunks* with a running shift ``m`` and a float64 sum ``s``.
   A chunk costs one read: its exp-sum in SIMD lanes, added to ``s`` in float64. ``m`` starts as
   the piece's first entry; it need not be the row max, only close enough that no term
   overflows. A chunk whose sum exceeds ``config.CPU_RESCAN_TRIGGER`` (or overflows) holds values
   well above ``m``: it is re-scanned from L1 with its exact max, ``s`` is rescaled, and the chunk
   summed again. On ordinary logits that happens about once per row.
3. :mod:`.finish` merges the pieces, gathers the label logit and gives special rows (NaN,
   ``+inf``, all ``-inf``) their canonical statistics by an exact re-scan.

The walk (:func:`walk`) is written once. Its exp-sum loop comes from the ISA marker it is compiled
for (:mod:`.simd.isa`: the portable loop or the hand-written AVX2 one), chosen at compile time.
The plain statistics (``m``, ``s``, target) run here, the plain ones plus entropy on the same
loops in :mod:`.entropy`; every other :class:`StatsSpec` runs the moments walk of :mod:`.moments`.

Rows are read in place: a block is handed to the kernels as a 1-D unit-stride view spanning its
rows plus a row stride, so ``logits[:, :-1]`` and ``[B, T, V]`` slices are never copied.
"""
from __future__ import annotations

import math

import numpy as np
import numba
from numba import prange

from .. import config
from .._rowpass import RowStats, StatsSpec, empty_stats
from ._jit import CHUNK, TRIGGER, jit, piece_bounds
from .finish import N_FIELDS, finish_kernel
from . import entropy as _entropy
from .moments import moments_kernel
from .simd import isa as _isa
from .simd.primitives import decode, neg_inf_like, zero_like

#: Encoded dtypes the kernels read (float32, float64, bfloat16 bits, float16 bits).
ENCODINGS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint16), np.dtype(np.int16))


# --------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------
@jit()
def chunk_max(chunk):
    """Exact max of the decoded chunk; NaN if it holds a NaN; -inf for an all -inf chunk.

    NaN-aware on purpose: a NaN among -inf entries, met while the running shift is still -inf,
    must poison the row, not be skipped with the -inf chunk it sits in.
    """
    best = neg_inf_like(chunk[0])
    poison = zero_like(chunk[0])
    for j in range(chunk.size):
        value = decode(chunk[j])
        best = value if value > best else best
        poison = value if value != value else poison
    return poison if poison != poison else best


@jit()
def walk(isa, piece):
    """``(m, s, ok)`` of a piece on ``isa``'s loop: ``lse(piece) = m + log(s)``.

    ``(-inf, 0)`` for an all -inf piece, ``(nan, nan)`` if it holds a NaN, ``(inf, nan)`` if it
    holds ``+inf`` (the finish re-scans such rows). ``ok`` is False when a shift lies outside the
    loop's range (:func:`.simd.isa.shift_limit`); the piece is then walked on the portable loop.
    """
    n = piece.size
    first = decode(piece[0])
    limit = _isa.shift_limit(isa, first)
    # Any finite entry is a usable first shift: it contributes exp(0) = 1, so the sum never
    # underflows, and a later chunk far above it trips the rescan below. Taking the first entry
    # skips a scalar max pass over the first chunk. A non-finite first entry waits for a chunk max.
    started = abs(first) < limit  # finite and in range (NaN compares false)
    m, consts, corr = _isa.setup(isa, first if started else zero_like(piece[0]))
    total = 0.0
    for start in range(0, n, CHUNK):
        chunk = piece[start:min(start + CHUNK, n)]
        if started:
            partial = _isa.expsum(isa, chunk, consts)
            # Not "> trigger": a NaN partial (NaN input) must also skip the rescan and reach the
            # total, where the finish spots it.
            if not partial > TRIGGER:
                total += corr * float(partial)
                continue
        top = chunk_max(chunk)
        if top != top:
            return math.nan, math.nan, True
        if top == -np.inf:
            continue
        if top == np.inf:
            return math.inf, math.nan, True
        if not abs(top) < limit:
            return 0.0, 0.0, False
        if not started or top > m:
            new_m, consts, corr = _isa.setup(isa, top)
            if total > 0.0:
                total *= math.exp(m - new_m)
            m = new_m
            started = True
        total += corr * float(_isa.expsum(isa, chunk, consts))
    if not started:
        return -math.inf, 0.0, True
    return m, total, True


@jit()
def piece_stats(isa, piece):
    """``(m, s)`` of a piece: :func:`walk` on ``isa``, on the portable loop where it cannot run."""
    m, s, ok = walk(isa, piece)
    if not ok:
        m, s, ok = walk(_isa.portable(), piece)
    return m, s


@jit(parallel=True)
def plain_kernel(isa, flat, row0, stride, n_rows, vocab, pieces_per_row, acc):
    """Fill ``acc[row, piece, 0:2]`` with the ``(m, s)`` of every piece of every row."""
    for task in prange(n_rows * pieces_per_row):
        row, piece, start, stop = piece_bounds(task, pieces_per_row, vocab)
        if start >= stop:
            acc[row, piece, 0], acc[row, piece, 1] = -np.inf, 0.0
        else:
            base = row0 + row * stride
            acc[row, piece, 0], acc[row, piece, 1] = piece_stats(isa, flat[base + start:base + stop])


# --------------------------------------------------------------------------------------------
# drivers
# --------------------------------------------------------------------------------------------
def pieces_per_row(n_rows: int, vocab: int, n_threads: int | None = None) -> int:
    """How many vocabulary pieces each row is split into.

    Enough rows keep every thread busy with whole rows (1 piece). With fewer rows than about four
    tasks per thread, rows are split, but never into pieces shorter than ``config.CPU_MIN_SEGMENT``
    (a piece's fixed cost is one exact-max chunk and a few scalars).
    """
    threads = n_threads or numba.get_num_threads()
    want_tasks = 4 * threads
    if n_rows >= want_tasks or n_rows == 0:
        return 1
    wanted = -(-want_tasks // n_rows)
    return max(1, min(wanted, vocab // config.CPU_MIN_SEGMENT))


def flat_rows(x: np.ndarray, what: str = "x", writeable: bool = False) -> tuple[np.ndarray, int, int]:
    """``(flat, row0, stride)``: row ``i`` of ``x`` is ``flat[row0 + i*stride:][:V]``, read in place.

    ``flat`` is a 1-D unit-stride view from the lowest-addressed row to the end of the highest,
    so the kernels see one C-contiguous array type whatever ``x``'s row stride (one compiled
    variant, and the AVX2 loop takes its chunks as they are). Raises ValueError unless ``x`` is
    2-D in a supported encoding with unit stride along V.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D NumPy array, got {type(x).__name__} "
                         f"with shape {getattr(x, 'shape', None)}")
    if x.dtype not in ENCODINGS:
        raise ValueError(f"{what} has dtype {x.dtype}; the CPU kernels read float32, float64, "
                         "uint16 (bfloat16 bits) or int16 (float16 bits)")
    n, vocab = x.shape
    item = x.dtype.itemsize
    if n == 0 or vocab == 0:
        return np.zeros(0, x.dtype), 0, 0
    if vocab > 1 and x.strides[1] != item:
        raise ValueError(f"{what} must have unit stride along its last axis (stride {x.strides[1]} bytes "
                         f"for {item}-byte elements)")
    if not x.dtype.isnative:
        raise ValueError(f"{what} must be in native byte order")
    stride = x.strides[0] if n > 1 else 0
    if stride % item:
        raise ValueError(f"{what} has a row stride of {stride} bytes, not a multiple of its {item}-byte items")
    stride //= item
    low = x[n - 1:] if stride < 0 else x
    span = (n - 1) * abs(stride) + vocab
    flat = np.lib.stride_tricks.as_strided(low, shape=(span,), strides=(item,), writeable=writeable)
    return flat, (n - 1) * -stride if stride < 0 else 0, stride


def _check_labels(y: np.ndarray, n: int) -> np.ndarray:
    if not (isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (n,)):
        raise ValueError(f"y must be an int64 array of shape ({n},), got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
    return np.ascontiguousarray(y)


def _no_vocab_stats(n: int, y: np.ndarray, spec: StatsSpec) -> RowStats:
    """Rows of no entries: the canonical all -inf statistics."""
    minus, zero, nan = np.full(n, -np.inf), np.zeros(n), np.full(n, np.nan)
    return RowStats(minus, zero, nan if spec.target else None, nan if spec.entropy else None,
                    nan if spec.dsum else None, minus.copy() if spec.pair else None,
                    zero.copy() if spec.pair else None, nan.copy() if spec.pair and spec.target else None,
                    nan.copy() if spec.pair else None)


def row_stats(x: np.ndarray, y: np.ndarray, spec: StatsSpec, w: np.ndarray | None = None) -> RowStats:
    """The row pass over one block (see :mod:`ptx_numba._rowpass`).

    Parameters
    ----------
    x : ndarray, shape (n, V)
        Encoded logits, unit stride along V, any row stride (read in place).
    y : ndarray of int64, shape (n,)
        Label per row in ``[0, V)``, or -1 for none.
    spec : StatsSpec
        What to compute. The plain spec runs the fast loops of this module; any other the
        moments walk of :mod:`.moments`.
    w : ndarray, shape (n, V), optional
        The second logit set (``spec.pair``).

    Returns
    -------
    RowStats
        float64 ``[n]`` arrays, the fields ``spec`` asks for.
    """
    flat, row0, stride = flat_rows(x)
    n, vocab = x.shape
    y = _check_labels(y, n)
    if spec.pair:
        if w is None or getattr(w, "shape", None) != x.shape:
            raise ValueError(f"spec.pair needs w of shape {x.shape}, got {getattr(w, 'shape', None)}")
        wflat, wrow0, wstride = flat_rows(w, "w")
    if n == 0:
        return empty_stats(spec)
    if vocab == 0:
        return _no_vocab_stats(n, y, spec)
    pieces = pieces_per_row(n, vocab)
    acc = np.zeros((n, pieces, N_FIELDS))
    cap = float(spec.softcap) if spec.softcap > 0.0 else None
    inv_t = float(spec.inv_temperature)
    marker = _isa.for_dtype(x.dtype, config.CPU_AVX2)
    if spec.plain:
        plain_kernel(marker, flat, row0, stride, n, vocab, pieces, acc)
    elif _entropy.handles(spec, marker):
        _entropy.entropy_kernel(marker, flat, row0, stride, n, vocab, pieces, acc)
    elif spec.pair:
        moments_kernel(flat, row0, stride, wflat, wrow0, wstride, n, vocab, pieces, inv_t, cap, acc)
    else:
        moments_kernel(flat, row0, stride, None, 0, 0, n, vocab, pieces, inv_t, cap, acc)
    out = np.empty((9, n))
    if spec.pair:
        finish_kernel(flat, row0, stride, wflat, wrow0, wstride, y, vocab, inv_t, cap, acc, out)
    else:
        finish_kernel(flat, row0, stride, None, 0, 0, y, vocab, inv_t, cap, acc, out)
    m, s, target, t, d, m_w, s_w, target_w, u = out
    return RowStats(m, s, target if spec.target else None, t if spec.entropy else None,
                    d if spec.dsum else None, m_w if spec.pair else None, s_w if spec.pair else None,
                    target_w if spec.pair and spec.target else None, u if spec.pair else None)
