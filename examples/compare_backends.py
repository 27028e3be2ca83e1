"""Time every backend available on this machine on one small batch, through the public API.

    python examples/compare_backends.py                       # float32 [64, 32000]
    python examples/compare_backends.py --rows 512 --vocab 128256 --dtype bfloat16

Each backend is called once untimed (compilation or cache load), then ``--repeat`` times; the
median is reported with the throughput in GB/s of logits and the largest difference from the
float64 reference. For a full side-by-side benchmark against PyTorch and a memory-read floor, use
``ptx-numba bench``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import ptx_numba as pn

DTYPES = ("float32", "float64", "float16", "bfloat16")


def make_logits(rows: int, vocab: int, dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((rows, vocab), dtype=np.float32)
    if dtype == "bfloat16":
        import ml_dtypes  # the bfloat16 dtype for NumPy (pip install ml_dtypes)

        return logits.astype(ml_dtypes.bfloat16), rng.integers(0, vocab, size=rows)
    return logits.astype(dtype), rng.integers(0, vocab, size=rows)


def median_seconds(call, repeat: int) -> float:
    call()  # compile or load from the cache; not timed
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    logits, labels = make_logits(args.rows, args.vocab, args.dtype)
    exact = pn.cross_entropy(logits, labels, reduction="none", backend="reference")
    print(f"{args.dtype} logits [{args.rows}, {args.vocab}], {logits.nbytes / 1e6:.1f} MB; "
          f"backends here: {', '.join(pn.available_backends())}")
    print(f"{'backend':<10}{'median ms':>11}{'GB/s':>8}{'max rel diff':>14}")
    for backend in pn.available_backends():
        def call(backend=backend):
            return pn.cross_entropy(logits, labels, reduction="none", backend=backend)

        seconds = median_seconds(call, args.repeat)
        rows = np.asarray(call(), dtype=np.float64)
        diff = float(np.max(np.abs(rows - exact) / np.maximum(1.0, np.abs(exact)), initial=0.0))
        print(f"{backend:<10}{seconds * 1e3:>11.3f}{logits.nbytes / seconds / 1e9:>8.2f}{diff:>14.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
