"""Shared setup for the pytest-benchmark suite (``pytest bench/ --benchmark-only``).

Inputs are generated once per shape and kept while consecutive tests use the same shape (the
test list is ordered shape-major), so only one large array lives in memory at a time.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from ptx_numba import _bench
from ptx_numba._validate import as_host_logits

_cache: dict[tuple, tuple] = {}

#: Median stream-read seconds per (dtype, V, N), filled by the stream-read tests, which run first
#: for each shape; the other contenders report their share of it.
STREAM_READ_SECONDS: dict[tuple, float] = {}


def pytest_addoption(parser):
    parser.addoption("--ptx-threads", type=int, default=None,
                     help="threads for Numba and torch (default: Numba's default, all cores)")


@pytest.fixture(scope="session", autouse=True)
def thread_count(request):
    """Apply ``--ptx-threads`` to Numba (and torch, when importable) for the whole session."""
    import numba

    threads = request.config.getoption("--ptx-threads") or numba.get_num_threads()
    with _bench.thread_count(threads):
        yield threads


@pytest.fixture(scope="session")
def machine():
    return _bench.machine_description()


def _case_inputs(dtype: str, vocab: int, rows: int):
    key = (dtype, vocab, rows)
    if key not in _cache:
        _cache.clear()
        if dtype == "bfloat16":
            pytest.importorskip("ml_dtypes")
        rng = np.random.default_rng(zlib.crc32(repr(key).encode()))  # same data in every run
        logits = _bench.synthetic_logits(rng, rows, vocab, dtype)
        labels = rng.integers(0, vocab, size=rows, dtype=np.int64)
        _cache[key] = (logits, labels, as_host_logits(logits)[0])
    return _cache[key]


@pytest.fixture(scope="session")
def case_inputs():
    """``case_inputs(dtype, V, N) -> (logits, labels, encoded)``; one shape is kept at a time."""
    return _case_inputs


@pytest.fixture
def report(benchmark, machine, thread_count):
    """Call ``report(dtype, V, N, nbytes, backend)`` after timing to fill ``benchmark.extra_info``."""

    def fill(dtype: str, vocab: int, rows: int, nbytes: int, backend: str) -> None:
        info = benchmark.extra_info
        info.update(backend=backend, dtype=dtype, N=rows, V=vocab, bytes=nbytes,
                    threads=thread_count, machine=machine)
        stats = getattr(benchmark, "stats", None)
        if not stats:  # --benchmark-disable: the function ran once, untimed
            return
        seconds = stats.stats.median
        info["gbps"] = nbytes / seconds / 1e9
        key = (dtype, vocab, rows)
        if backend == _bench.STREAM_READ:
            STREAM_READ_SECONDS[key] = seconds
        if key in STREAM_READ_SECONDS:
            info["pct_of_stream_read"] = 100.0 * STREAM_READ_SECONDS[key] / seconds

    return fill
