"""The one Numba configuration of the CPU kernels, the walk's compile-time constants, and how a
row is cut into pieces for the threads."""
from __future__ import annotations

from numba import njit

from .. import config

#: Fast-math flags (never ``nnan``/``ninf``: comparisons with -inf must keep their meaning).
FLAGS = set(config.CPU_FASTMATH)
#: Elements per chunk (read at import: a compile-time constant of the cached kernels).
CHUNK = config.CPU_CHUNK
#: A chunk whose float32 exp-sum exceeds this (or overflows) is re-scanned with its exact max.
TRIGGER = config.CPU_RESCAN_TRIGGER
#: The rescan threshold of the walks that also sum moments (see config.CPU_MOMENT_RESCAN_TRIGGER).
MOMENT_TRIGGER = config.CPU_MOMENT_RESCAN_TRIGGER


def jit(parallel: bool = False, strict: bool = False):
    """``njit`` as every CPU kernel uses it: cached, nogil, the explicit fast-math flag set.

    ``strict`` drops fast-math where the order of operations is the point: with "reassoc",
    LLVM may rewrite ``log(s) - (z_y - m)`` as ``(log(s) - z_y) + m`` and bring back the
    cancellation it exists to avoid (CE 1e-7 came out as 0 at offsets of 2.5e9).
    """
    return njit(fastmath=False if strict else FLAGS, parallel=parallel, cache=True, nogil=True)


@jit()
def piece_bounds(task, pieces_per_row, vocab):
    """``(row, piece, start, stop)`` of task ``task`` (one piece of one row).

    The parallel kernels run ``n_rows * pieces_per_row`` tasks; a row's pieces have equal lengths
    but the last (``start >= stop`` for a piece past the end of a short row: an empty piece).
    """
    piece_len = (vocab + pieces_per_row - 1) // pieces_per_row
    row = task // pieces_per_row
    piece = task - row * pieces_per_row
    start = piece * piece_len
    return row, piece, start, min(start + piece_len, vocab)
