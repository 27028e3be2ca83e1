"""Which exp-sum loop reaches the read floor: the same row walk on each loop, side by side.

For each dtype this makes one array of logits ``[N, V]`` (normal, standard deviation 3) and
times, in interleaved rounds in one process (median of ``--repeat`` rounds, one call each):

* ``read``: the streaming read of the same bytes (``ptx_numba._bench_floor.stream_read``), the floor;
* ``cpu``: the backend's row pass (``cpu.BACKEND.row_stats``: the loop ``features.choose()``
  picks, honouring ``PTX_NUMBA_CPU_ISA``, with its walk and finish);
* one parallel walk per loop: every row through a chunked walk like
  :func:`ptx_numba.cpu.rowpass.walk` (first entry as the shift, rescan of a chunk whose sum
  exceeds the trigger), with the loop swapped: ``avx2`` (the 8-lane loop; float16 16 elements per
  iteration, widened per 8 lanes, no prefetch), ``avx2-f16fix`` (8 lanes, float16 read 64 bytes
  per iteration with a prefetch per line), ``avx2-16`` (16 lanes on AVX2 instructions) and
  ``avx512`` (16 lanes, zmm table; only where the target has AVX-512).

Every walk's per-row log-sum-exp is checked against the backend's before timing. One task per
row (N must be at least a few times the thread count).

    python bench/isa_ablation.py --rows 4096,512 --vocab 128256 --threads 2
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit, prange

from ptx_numba import _finish, config, cpu
from ptx_numba._bench_floor import stream_read
from ptx_numba._rowpass import StatsSpec
from ptx_numba.cpu.rowpass import chunk_max as _chunk_max
from ptx_numba.cpu.rowpass import piece_stats as _piece_stats
from ptx_numba.cpu.simd import expsum
from ptx_numba.cpu.simd import features as isa
from ptx_numba.cpu.simd.isa import portable as _portable
from ptx_numba.cpu.simd.primitives import decode, zero_like
_CHUNK = config.CPU_CHUNK
_TRIGGER = config.CPU_RESCAN_TRIGGER
_FLAGS = set(config.CPU_FASTMATH)


def _make_walk(loop):
    """A parallel kernel: per-row LSE by the chunked walk of :mod:`ptx_numba.cpu.rowpass` on ``loop``."""
    constants = expsum.constants
    limit_of = expsum.shift_limit

    @njit(fastmath=_FLAGS, cache=False, nogil=True)
    def piece_stats(piece):
        n = piece.size
        first = decode(piece[0])
        limit = limit_of(first)
        m = -np.inf
        corr = 1.0
        k = ms = lo = hi = zero_like(piece[0])
        if abs(first) < limit:
            m, k, ms, lo, hi, corr = constants(first)
        total = 0.0
        for start in range(0, n, _CHUNK):
            chunk = piece[start:min(start + _CHUNK, n)]
            if m != -np.inf:
                partial = loop(chunk, k, ms, lo, hi)
                if not partial > _TRIGGER:
                    total += corr * float(partial)
                    continue
            chunk_max = _chunk_max(chunk)
            if chunk_max == -np.inf:
                continue
            if not abs(chunk_max) < limit:
                return _piece_stats(_portable(), piece)
            if chunk_max > m:
                new_m, k, ms, lo, hi, corr = constants(chunk_max)
                if total > 0.0:
                    total *= math.exp(m - new_m)
                m = new_m
            total += corr * float(loop(chunk, k, ms, lo, hi))
        return m, total

    @njit(fastmath=_FLAGS, cache=False, parallel=True, nogil=True)
    def walk(logits, out):
        for row in prange(logits.shape[0]):
            m, s = piece_stats(logits[row])
            out[row] = m + math.log(s)

    return walk


def _logits(dtype, rows, vocab, seed=0):
    """Normal logits (sd 3) in the stored encoding, made in row blocks to bound temporaries."""
    rng = np.random.default_rng(seed)
    stored = {"float32": np.float32, "float64": np.float64, "bfloat16": np.uint16, "float16": np.int16}[dtype]
    out = np.empty((rows, vocab), dtype=stored)
    for start in range(0, rows, 256):
        block = rng.standard_normal((min(256, rows - start), vocab), dtype=np.float32) * np.float32(3.0)
        if dtype == "bfloat16":
            block = (block.view(np.uint32) >> 16).astype(np.uint16)
        elif dtype == "float16":
            block = block.astype(np.float16).view(np.int16)
        out[start:start + block.shape[0]] = block
    return out


def _loops(available):
    """The loops compared, by name (``avx512`` only where the target has it)."""
    loops = {"avx2": expsum.expsum_avx2, "avx2-f16fix": expsum.expsum_avx2_f16fix, "avx2-16": expsum.expsum_avx2_16}
    if "avx512" in available:
        loops["avx512"] = expsum.expsum_avx512
    return loops


def _contenders(available):
    return {name: _make_walk(loop) for name, loop in _loops(available).items()}


def _make_repeat(loop):
    constants = expsum.constants

    @njit(fastmath=_FLAGS, cache=False)
    def repeat(chunk, shift, reps):
        _, k, ms, lo, hi, _ = constants(shift)
        total = 0.0
        for _ in range(reps):
            total += loop(chunk, k, ms, lo, hi)
        return total

    return repeat


def micro(dtypes, trials=15):
    """ns per element of each loop alone on one L1-resident chunk, one thread (best of ``trials``)."""
    loops = _loops(isa.available())
    values = (np.random.default_rng(0).standard_normal(_CHUNK) * 3).astype(np.float32)
    encoded = {"float32": values, "bfloat16": (values.view(np.uint32) >> 16).astype(np.uint16),
               "float16": values.astype(np.float16).view(np.int16), "float64": values.astype(np.float64)}
    print(f"ns/element, one {_CHUNK}-element chunk in L1, 1 thread, best of {trials} (interleaved)")
    print(f"{'dtype':9s}" + "".join(f"{name:>13s}" for name in loops))
    repeats = {name: _make_repeat(loop) for name, loop in loops.items()}
    for dtype in dtypes:
        chunk = encoded[dtype]
        shift = np.float64(1.0) if dtype == "float64" else np.float32(1.0)
        reps = 4000
        best = {}
        for fn in repeats.values():
            fn(chunk, shift, 1)
        for _ in range(trials):
            for name, fn in repeats.items():
                t0 = time.perf_counter()
                fn(chunk, shift, reps)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        print(f"{dtype:9s}" + "".join(f"{best[n] / (reps * chunk.size) * 1e9:13.3f}" for n in loops))


def run(dtypes, rows_list, vocab, repeat):
    available = isa.available()
    walks = _contenders(available)
    print(f"threads {numba.get_num_threads()}, ISAs available {available}, backend on {isa.choose()}, "
          f"{repeat} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    for rows in rows_list:
        for dtype in dtypes:
            x = _logits(dtype, rows, vocab)
            nbytes = x.nbytes
            labels = np.full(rows, -1, dtype=np.int64)

            def backend(x=x, labels=labels):
                return _finish.lse(cpu.BACKEND.row_stats(x, labels, StatsSpec()))

            want = backend()
            calls = {"read": lambda x=x: stream_read(x), "cpu": backend}
            outs = {}
            for name, walk in walks.items():
                outs[name] = np.empty(rows)
                calls[name] = (lambda w, o: (lambda: w(x, o)))(walk, outs[name])
            for name, call in calls.items():  # warm-up (compile), then check agreement
                call()
            for name, out in outs.items():
                err = np.max(np.abs(out - want) / np.maximum(1.0, np.abs(want)))
                if not err < 1e-5:
                    raise SystemExit(f"{name} {dtype} disagrees with the backend: {err:.2e}")
            times = {name: [] for name in calls}
            cpu_times = {name: [] for name in calls}
            for _ in range(repeat):
                for name, call in calls.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    call()
                    times[name].append(time.perf_counter() - t0)
                    cpu_times[name].append(time.process_time() - c0)
            floor = statistics.median(times["read"])
            # CPU seconds per thread: on a shared machine, the time this process actually ran
            # (waiting for a core is excluded; OpenMP's spinning is not, so this is for 1 thread)
            floor_cpu = statistics.median(cpu_times["read"]) / numba.get_num_threads()
            regime = "in L3 (300 MB)?" if nbytes < 300e6 else "past L3"
            print(f"\n{dtype} [{rows}, {vocab}] {nbytes / 1e9:.2f} GB ({regime})")
            for name, ts in times.items():
                t = statistics.median(ts)
                c = statistics.median(cpu_times[name]) / numba.get_num_threads()
                print(f"  {name:12s} {t * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f}  {nbytes / t / 1e9:6.1f} GB/s"
                      f"  {100 * floor / t:5.0f}% of read   cpu time/thread {c * 1e3:8.1f} ms"
                      f"  {100 * floor_cpu / c:5.0f}%")
            del x
            sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32,bfloat16,float16,float64")
    parser.add_argument("--rows", default="4096,512")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--micro", action="store_true", help="time each loop on one L1-resident chunk instead")
    args = parser.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.micro:
        micro(args.dtype.split(","))
        return
    run(args.dtype.split(","), [int(r) for r in args.rows.split(",")], args.vocab, args.repeat)


if __name__ == "__main__":
    main()
