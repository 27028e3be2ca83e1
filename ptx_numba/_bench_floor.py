"""The bandwidth floor of the benchmarks: a parallel streaming read of an array (Numba)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True)
def stream_read_kernel(words, block):
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
        total += int(stream_read_kernel(raw[:8 * n_words].view(np.uint64), 1 << 13))
    return total % 2**64


@njit(parallel=True, cache=True, nogil=True)
def stream_copy_kernel(src, dst, block):
    """Copy ``src`` into ``dst`` (64-bit words), blocks in parallel: a streaming read and write."""
    n_blocks = (src.size + block - 1) // block
    for b in prange(n_blocks):
        for j in range(b * block, min((b + 1) * block, src.size)):
            dst[j] = src[j]


def stream_copy(src: np.ndarray, dst: np.ndarray) -> None:
    """Copy C-contiguous ``src`` into ``dst`` (same shape and dtype) on Numba's threads.

    The write floor of a gradient: one streaming read and one streaming write of the array, on
    as many threads as the kernels use (``np.copyto`` runs on one).
    """
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise ValueError(f"stream_copy: {src.shape} {src.dtype} into {dst.shape} {dst.dtype}")
    a = src.reshape(-1).view(np.uint8)
    b = dst.reshape(-1).view(np.uint8)
    n_words = a.size // 8
    if n_words:
        stream_copy_kernel(a[:8 * n_words].view(np.uint64), b[:8 * n_words].view(np.uint64), 1 << 13)
    b[8 * n_words:] = a[8 * n_words:]
