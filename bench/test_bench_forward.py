"""Forward cross entropy (``reduction="none"``) across backends, vocabularies, dtypes and batch sizes.

Run with ``pytest bench/ --benchmark-only`` (see bench/README.md). For each shape the stream-read
floor runs first, then every host backend, then PyTorch; each records GB/s (logits bytes read per
second, median) and its share of the stream-read floor in ``extra_info``. The float64 NumPy
reference takes seconds per call at these sizes, so it is timed at one shape only.
"""
from __future__ import annotations

import pytest

from ptx_numba import _bench, available_backends, cross_entropy

VOCABS = (32000, 128256, 151936, 262144)  # Llama-2, Llama-3, Qwen-2, Gemma-3
DTYPES = ("float32", "bfloat16", "float16", "float64")
ROWS = (1, 4, 512)
REFERENCE_SHAPE = ("float32", 128256, 512)

# Kernels only: the reference is handled separately, the CUDA backend is benchmarked elsewhere
# (host input here would mostly measure the PCIe copy).
KERNELS = tuple(b for b in available_backends() if b not in ("reference", "cuda"))
CONTENDERS = (_bench.STREAM_READ,) * ("cpu" in KERNELS) + KERNELS + (_bench.TORCH,)


def _cases():
    """Shape-major order, so each shape's arrays are generated once (see conftest.case_inputs)."""
    for dtype in DTYPES:
        for vocab in VOCABS:
            for rows in ROWS:
                for backend in CONTENDERS:
                    yield pytest.param(backend, dtype, vocab, rows, id=f"{backend}-{dtype}-V{vocab}-N{rows}")
                if (dtype, vocab, rows) == REFERENCE_SHAPE:
                    name = f"reference-{dtype}-V{vocab}-N{rows}"
                    yield pytest.param("reference", dtype, vocab, rows, id=name)


def _timed_call(backend, logits, labels, encoded):
    if backend == _bench.STREAM_READ:
        from ptx_numba._bench_floor import stream_read

        return lambda: stream_read(encoded)
    if backend == _bench.TORCH:
        from ptx_numba._bench_ops import OPS, Inputs

        return OPS["cross_entropy"].torch(Inputs(logits, labels))
    return lambda: cross_entropy(logits, labels, reduction="none", backend=backend)


@pytest.mark.parametrize(("backend", "dtype", "vocab", "rows"), list(_cases()))
def test_cross_entropy_forward(benchmark, case_inputs, report, backend, dtype, vocab, rows):
    if backend == _bench.TORCH:
        pytest.importorskip("torch")
    logits, labels, encoded = case_inputs(dtype, vocab, rows)
    call = _timed_call(backend, logits, labels, encoded)
    benchmark.group = f"{dtype} V={vocab} N={rows}"
    if backend == "reference":
        # Seconds per call: a few rounds are plenty, and auto-calibration would take minutes.
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0)
    else:
        call()  # compile / load the kernel outside the timing
        benchmark(call)
    report(dtype, vocab, rows, encoded.nbytes, backend)
