"""Per-element cost of the CPU kernel's inner loops, single thread, on an L1-resident chunk.

Separates compute from bandwidth: if ``expsum`` costs more per element than ``read`` does at the
machine's streaming bandwidth, the fused kernel is exp-bound, whatever the memory system does.

    python bench/micro_chunk.py            # prints ns/element per dtype
"""
import time

import numpy as np
from numba import njit

from ptx_numba import config
from ptx_numba.cpu.rowpass import chunk_max
from ptx_numba.cpu.simd import avx2 as _avx2
from ptx_numba.cpu.simd.isa import portable_expsum

_FLAGS = set(config.CPU_FASTMATH)


@njit(fastmath=_FLAGS, cache=False)
def _repeat_expsum(chunk, shift, reps):
    total = 0.0
    for _ in range(reps):
        total += portable_expsum(chunk, shift)
    return total


@njit(fastmath=_FLAGS, cache=False)
def _repeat_expsum_avx2(chunk, shift, reps):
    _, k, ms, lo, hi, _ = _avx2.constants(shift)
    total = 0.0
    for _ in range(reps):
        total += _avx2.expsum(chunk, k, ms, lo, hi)
    return total


@njit(fastmath=_FLAGS, cache=False)
def _repeat_max(chunk, reps):
    total = 0.0
    for _ in range(reps):
        total += chunk_max(chunk)
    return total


def _encodings(values):
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    f16 = values.astype(np.float16).view(np.int16)
    return {"float32": values, "bfloat16": bf16, "float16": f16, "float64": values.astype(np.float64)}


def _ns_per_element(fn, args, n, reps, trials=9):
    fn(*args[:-1], 1)
    best = min(_timed(fn, args) for _ in range(trials))
    return best / (n * reps) * 1e9


def _timed(fn, args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    import numba

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(config.CPU_CHUNK) * 3).astype(np.float32)
    reps = 20000
    print(f"chunk = {config.CPU_CHUNK} elements, {reps} repetitions, best of 9, 1 thread")
    print("expsum: the portable Numba loop; avx2: the hand-written 8-lane loop (ptx_numba.cpu.simd.avx2)")
    print(f"{'dtype':9s} {'expsum ns/el':>13s} {'avx2 ns/el':>11s} {'max ns/el':>10s}")
    for name, chunk in _encodings(values).items():
        shift = np.float64(1.0) if name == "float64" else np.float32(1.0)
        t_exp = _ns_per_element(_repeat_expsum, (chunk, shift, reps), chunk.size, reps)
        t_avx2 = float("nan")
        if _avx2.supports(chunk.dtype):
            t_avx2 = _ns_per_element(_repeat_expsum_avx2, (chunk, shift, reps), chunk.size, reps)
        t_max = _ns_per_element(_repeat_max, (chunk, reps), chunk.size, reps)
        print(f"{name:9s} {t_exp:13.3f} {t_avx2:11.3f} {t_max:10.3f}")


if __name__ == "__main__":
    main()
