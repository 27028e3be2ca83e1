"""CPU backend: a fused, vectorized Numba kernel for per-row log-sum-exp and cross entropy.

The story of one row ``z`` (length V):

1. The row is cut into *pieces* (the whole row when there are enough rows to keep every thread
   busy; otherwise a few vocabulary segments per row, so N = 1..4 still uses every core).
2. Each piece is walked in L1-sized *chunks* with a running shift ``m`` and a float64 sum ``s``
   such that ``lse(piece) = m + log(s)``. A chunk costs one read: ``sum exp(z_j - m)`` in float32
   SIMD lanes (:func:`._simd.fast_exp`), added to ``s`` in float64. ``m`` starts as the piece's
   first entry; it need not be the row max, only close enough that no term overflows. A chunk whose
   float32 sum exceeds ``config.CPU_RESCAN_TRIGGER`` (or overflows) holds values well above ``m``:
   it is re-scanned from L1 with its exact max, ``s`` is rescaled, and the chunk summed again. On
   ordinary logits that happens about once per row, so the row is streamed from memory once.
3. Pieces are merged with the usual ``(m, s)`` rescaling, the label logit is gathered, and
   ``ce = log(s) - (z_y - m)`` is formed in float64 (no cancellation between two large numbers).
4. Rows whose result is not finite (``+inf``/NaN entries, all ``-inf``) are recomputed by a plain
   float64 two-pass loop with exactly the reference's special-value semantics.

Memory beyond the inputs is O(N * pieces_per_row) float64. Kernels specialise on the encoded dtype
(float32, float64, bfloat16 bits as uint16, float16 bits as int16; see :mod:`._validate`) and are
compiled on first use with ``cache=True``, so later processes load them from Numba's disk cache.
"""
from __future__ import annotations

import math

import numpy as np

from . import config
from .errors import KernelUnavailable

NAME = "cpu"

try:  # numba is a core dependency, but a broken install must degrade, not break the package
    import numba
    from numba import njit, prange

    from . import _avx2
    from ._simd import decode, fast_exp, neg_inf_like, zero_like

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - exercised only on broken installs
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def is_available() -> tuple[bool, str]:
    """The CPU backend needs an importable Numba; compilation problems surface on first use."""
    if _IMPORT_ERROR:
        return False, f"numba could not be imported ({_IMPORT_ERROR})"
    return True, ""


if not _IMPORT_ERROR:
    _FLAGS = set(config.CPU_FASTMATH)
    _CHUNK = config.CPU_CHUNK
    _TRIGGER = config.CPU_RESCAN_TRIGGER

    def _jit(parallel=False, strict=False):
        """The one njit configuration of this module: cached, explicit fast-math flag set.

        ``strict`` drops fast-math where the order of operations is the point: with "reassoc",
        LLVM may rewrite ``log(s) - (z_y - m)`` as ``(log(s) - z_y) + m`` and bring back the
        cancellation it exists to avoid (CE 1e-7 came out as 0 at offsets of 2.5e9).
        """
        return njit(fastmath=False if strict else _FLAGS, parallel=parallel, cache=True, nogil=True)

    # ----------------------------------------------------------------------------------------
    # chunk and piece primitives (inlined by LLVM into the kernels)
    # ----------------------------------------------------------------------------------------
    @_jit()
    def _chunk_max(chunk):
        """Exact max of the decoded chunk (NaNs ignored; -inf for an all -inf chunk)."""
        best = neg_inf_like(chunk[0])
        for j in range(chunk.size):
            value = decode(chunk[j])
            best = value if value > best else best
        return best

    @_jit()
    def _chunk_expsum(chunk, shift):
        """``sum_j exp(z_j - shift)`` in the compute type's SIMD lanes."""
        total = zero_like(chunk[0])
        for j in range(chunk.size):  # a 0-based loop over a slice: no wraparound index checks
            total += fast_exp(decode(chunk[j]) - shift)
        return total

    @_jit()
    def _piece_stats(piece):
        """``(m, s)`` with ``lse(piece) = m + log(s)``; ``(-inf, 0)`` if all entries are -inf."""
        n = piece.size
        # Any finite entry is a usable first shift: it contributes exp(0) = 1, so the sum never
        # underflows, and a later chunk far above it trips the rescan below. Taking the first
        # entry skips a scalar max pass over the first chunk (LLVM keeps NaN-aware max reductions
        # scalar). A non-finite first entry falls back to that exact max.
        shift = decode(piece[0])
        if not (shift > neg_inf_like(shift) and shift < -neg_inf_like(shift)):
            shift = neg_inf_like(shift)
        total = 0.0
        for start in range(0, n, _CHUNK):
            chunk = piece[start:min(start + _CHUNK, n)]
            if shift != -np.inf:
                partial = _chunk_expsum(chunk, shift)
                # Not "> trigger": a NaN partial (NaN input) must also skip the rescan and
                # reach the total, where the final pass spots it.
                if not partial > _TRIGGER:
                    total += float(partial)
                    continue
            chunk_max = _chunk_max(chunk)
            if chunk_max == -np.inf:
                continue
            if chunk_max > shift:
                if total > 0.0:
                    total *= math.exp(float(shift) - float(chunk_max))
                shift = chunk_max
            total += float(_chunk_expsum(chunk, shift))
        return float(shift), total

    @_jit()
    def _piece_stats_avx2(piece):
        """:func:`_piece_stats` on the hand-written AVX2 loops (every encoding).

        Same walk, but each chunk costs one :func:`._avx2.expsum` and the shift is ``m = S/K`` for
        an integer ``S`` near ``K`` times the first entry (or a re-scanned chunk max), with the
        float32 or float64 constants picked by the decoded type. Shifts outside the loop's range
        (|m| above ~3.6e5 for float32-computed encodings, ~7.8e14 for float64; +inf) send the
        piece to :func:`_piece_stats`.
        """
        n = piece.size
        first = decode(piece[0])
        limit = _avx2.shift_limit(first)
        m = -np.inf
        corr = 1.0
        k = ms = lo = hi = zero_like(piece[0])
        if abs(first) < limit:  # finite and in range (NaN compares false)
            m, k, ms, lo, hi, corr = _avx2.constants(first)
        total = 0.0
        for start in range(0, n, _CHUNK):
            chunk = piece[start:min(start + _CHUNK, n)]
            if m != -np.inf:
                partial = _avx2.expsum(chunk, k, ms, lo, hi)
                if not partial > _TRIGGER:  # NaN partials reach the total (see _piece_stats)
                    total += corr * float(partial)
                    continue
            chunk_max = _chunk_max(chunk)
            if chunk_max == -np.inf:
                continue
            if not abs(chunk_max) < limit:
                return _piece_stats(piece)
            if chunk_max > m:
                new_m, k, ms, lo, hi, corr = _avx2.constants(chunk_max)
                if total > 0.0:
                    total *= math.exp(m - new_m)
                m = new_m
            total += corr * float(_avx2.expsum(chunk, k, ms, lo, hi))
        return m, total

    @_jit()
    def _row_lse_exact(row):
        """Two-pass float64 log-sum-exp with the reference's special values (slow path)."""
        best = -np.inf
        for j in range(row.size):
            value = float(decode(row[j]))
            best = value if value > best else best
        shift = best if math.isfinite(best) else 0.0
        total = 0.0
        for j in range(row.size):
            total += math.exp(float(decode(row[j])) - shift)
        if total == 0.0:
            return -np.inf
        return math.log(total) + shift

    # ----------------------------------------------------------------------------------------
    # kernels
    # ----------------------------------------------------------------------------------------
    @_jit()
    def _piece_bounds(task, pieces_per_row, vocab):
        """``(row, piece, start, stop)`` of task ``task`` (one piece of one row)."""
        piece_len = (vocab + pieces_per_row - 1) // pieces_per_row
        row = task // pieces_per_row
        piece = task - row * pieces_per_row
        start = piece * piece_len
        return row, piece, start, min(start + piece_len, vocab)

    @_jit(parallel=True)
    def _pieces_kernel(logits, pieces_per_row, shifts, totals):
        """Fill ``shifts/totals[N, P]`` with the ``(m, s)`` of each of the P pieces of each row."""
        n_rows, vocab = logits.shape
        for task in prange(n_rows * pieces_per_row):
            row, piece, start, stop = _piece_bounds(task, pieces_per_row, vocab)
            if start >= stop:
                shifts[row, piece], totals[row, piece] = -np.inf, 0.0
            else:
                shifts[row, piece], totals[row, piece] = _piece_stats(logits[row, start:stop])

    # Two kernels that differ in the piece function, not one taking it as an argument: a function
    # argument is typed by the dispatcher object's identity, so Numba's disk cache missed on every
    # new process (measured). A runtime flag would compile the AVX2 intrinsics on every CPU.
    @_jit(parallel=True)
    def _pieces_kernel_avx2(logits, pieces_per_row, shifts, totals):
        """:func:`_pieces_kernel` on the AVX2 loop (compiled only where :mod:`._avx2` runs)."""
        n_rows, vocab = logits.shape
        for task in prange(n_rows * pieces_per_row):
            row, piece, start, stop = _piece_bounds(task, pieces_per_row, vocab)
            if start >= stop:
                shifts[row, piece], totals[row, piece] = -np.inf, 0.0
            else:
                shifts[row, piece], totals[row, piece] = _piece_stats_avx2(logits[row, start:stop])

    @_jit(parallel=True, strict=True)
    def _finish_kernel(logits, labels, ignore_index, shifts, totals, lse_out, ce_out):
        """Merge pieces into per-row LSE and CE (ignored rows: CE 0); redo non-finite rows."""
        n_rows, pieces_per_row = shifts.shape
        for row in prange(n_rows):
            m = -np.inf
            special = False
            for p in range(pieces_per_row):
                m = shifts[row, p] if shifts[row, p] > m else m
                # +inf or NaN entries leave a non-finite shift or total behind
                special |= math.isnan(totals[row, p]) or math.isinf(totals[row, p])
                special |= shifts[row, p] == np.inf
            s = 0.0
            if m != -np.inf and not special:
                for p in range(pieces_per_row):
                    if totals[row, p] > 0.0:
                        s += totals[row, p] * math.exp(shifts[row, p] - m)
            log_s = math.log(s) if s > 0.0 else -np.inf
            lse = m + log_s
            special |= m == -np.inf  # all -inf: the exact path returns -inf as the reference does
            if special:
                lse = _row_lse_exact(logits[row])
            lse_out[row] = lse
            label = labels[row]
            if label == ignore_index or label < 0 or label >= logits.shape[1]:
                ce_out[row] = 0.0  # labels were range-checked; the guard keeps reads in bounds
            else:
                target = float(decode(logits[row, label]))
                # log(s) - (z_y - m) avoids subtracting two large numbers (lse - z_y) when the
                # logits carry a large common offset.
                ce_out[row] = (lse - target) if special else (log_s - (target - m))

    @_jit(parallel=True)
    def _stream_read_kernel(words, block):
        """Wrapping sum of every 64-bit word: a pure streaming read, the bandwidth floor.

        Integer words, not the stored dtype: summing 16-bit floats costs a conversion per
        element, which made the "floor" of bfloat16/float16 arrays compute bound (it ran at
        14-17 GB/s on one thread where float32 read at 22).
        """
        n_blocks = (words.size + block - 1) // block
        partial = np.zeros(n_blocks, dtype=np.uint64)
        for b in prange(n_blocks):
            part = words[b * block:min((b + 1) * block, words.size)]
            acc = np.uint64(0)
            for j in range(part.size):
                acc += part[j]
            partial[b] = acc
        return partial.sum()


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


def uses_avx2(dtype: np.dtype) -> bool:
    """Whether logits of this encoded dtype run on the AVX2 loop (``config.CPU_AVX2`` permitting)."""
    return config.CPU_AVX2 is not False and _avx2.supports(np.dtype(dtype))


def row_stats(x: np.ndarray, labels: np.ndarray | None, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``(lse, ce)`` as float64 arrays ``[N]`` (``ce`` is 0 where ignored / unlabelled).

    Parameters
    ----------
    x : ndarray, shape (N, V)
        Encoded logits (read-only, C-contiguous; see :mod:`._validate`).
    labels : ndarray of int64, shape (N,), or None
    ignore_index : int
    """
    n_rows, vocab = x.shape
    lse = np.empty(n_rows, dtype=np.float64)
    ce = np.zeros(n_rows, dtype=np.float64)
    if n_rows == 0:
        return lse, ce
    if labels is None:
        labels = np.full(n_rows, ignore_index, dtype=np.int64)
    pieces = pieces_per_row(n_rows, vocab)
    shifts = np.empty((n_rows, pieces), dtype=np.float64)
    totals = np.empty((n_rows, pieces), dtype=np.float64)
    kernel = _pieces_kernel_avx2 if uses_avx2(x.dtype) else _pieces_kernel
    try:
        kernel(x, pieces, shifts, totals)
        _finish_kernel(x, labels, np.int64(ignore_index), shifts, totals, lse, ce)
    except (KernelUnavailable, MemoryError, ValueError, TypeError):
        raise
    except Exception as exc:  # compilation / cache-load failures
        raise KernelUnavailable(f"the CPU kernel could not run: {type(exc).__name__}: {exc}") from exc
    return lse, ce


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp, float64 ``[N]`` (same contract as :func:`.reference.logsumexp_rows`)."""
    return row_stats(x, None, config.DEFAULT_IGNORE_INDEX)[0]


def cross_entropy_rows(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """Per-row cross entropy, float64 ``[N]``, 0 for ignored rows."""
    return row_stats(x, labels, ignore_index)[1]


def cross_entropy_sum(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> tuple[float, int]:
    """Sum of per-row CE over non-ignored rows (float64) and the number of such rows."""
    ce = row_stats(x, labels, ignore_index)[1]
    return float(ce.sum()), int(np.count_nonzero(labels != ignore_index))


def stream_read(x: np.ndarray) -> int:
    """Read every byte of ``x`` once, in parallel (the bandwidth floor for benchmarks).

    Returns the wrapping (mod 2**64) sum of the array's bytes taken as little-endian 64-bit words,
    the last partial word zero-padded: a checksum that depends on every byte, so no read can be
    skipped.
    """
    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    n_words = raw.size // 8
    tail = np.zeros(8, dtype=np.uint8)
    tail[:raw.size - 8 * n_words] = raw[8 * n_words:]
    total = int(tail.view(np.uint64)[0])
    if n_words:
        total += int(_stream_read_kernel(raw[:8 * n_words].view(np.uint64), 1 << 13))
    return total % 2**64
