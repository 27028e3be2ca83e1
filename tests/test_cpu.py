"""The fused CPU kernel: internal paths (chunk rescans, row splitting, slow path) and caching."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.special import logsumexp as scipy_lse

import ptx_numba as pn
from ptx_numba import _bench_floor, _finish, _validate, config, cpu
from ptx_numba._rowpass import StatsSpec

pytestmark = pytest.mark.skipif(not cpu.BACKEND.is_available()[0], reason="numba unavailable")


@pytest.fixture
def kernel_path(cpu_isa):
    """Run a test on each exp-sum loop (see ``cpu_isa`` in conftest.py)."""
    return cpu_isa


def _exact(z64, labels):
    lse = scipy_lse(z64, axis=1)
    return lse, lse - z64[np.arange(len(labels)), labels]


def _lse_ce(x, labels, ignore_index):
    """Per-row ``(lse, ce)`` from the backend's row pass (ce 0 where ignored)."""
    labels = np.asarray(labels, dtype=np.int64)
    y = np.where(labels == ignore_index, -1, labels).astype(np.int64)
    st = cpu.BACKEND.row_stats(x, y, StatsSpec(target=True))
    return _finish.lse(st), _finish.cross_entropy(st, y >= 0, x.shape[1])


def _run(raw, labels):
    x, _, _ = _validate.as_host_logits(raw)
    return _lse_ce(x, labels, -100)


def _rel(a, b):
    return np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))


@pytest.mark.parametrize("jump", [25.0, 60.0, 95.0, 300.0, 3e4])
def test_late_large_logit_triggers_rescan(kernel_path, rng, jump):
    # the running shift starts at the first entry; a much larger value chunks later must be caught
    v = 5 * config.CPU_CHUNK + 17
    z = rng.standard_normal((3, v)).astype(np.float32)
    z[0, 4 * config.CPU_CHUNK + 3] += jump
    z[1, -1] += jump
    z[2, config.CPU_CHUNK:] += jump  # every later chunk jumps
    labels = [4 * config.CPU_CHUNK + 3, v - 1, 0]
    lse, ce = _run(z, labels)
    want_lse, want_ce = _exact(z.astype(np.float64), labels)
    assert _rel(lse, want_lse) < 2e-5 and _rel(ce, want_ce) < 2e-5


@pytest.mark.parametrize("first", [-1e6, -3e4, -200.0, -30.0, 30.0, 200.0, 3e4, 1e6, -np.inf])
def test_first_entry_far_from_the_rest_of_the_row(kernel_path, rng, first):
    # the first entry seeds the running shift: far below the row (every term would overflow
    # without the rescan), far above it (every other term underflows), or masked
    v = 2 * config.CPU_CHUNK + 9
    z = rng.standard_normal((2, v)).astype(np.float32)
    z[:, 0] = first
    labels = [0, v // 2] if np.isfinite(first) else [v - 1, v // 2]
    lse, ce = _run(z, labels)
    want_lse, want_ce = _exact(z.astype(np.float64), labels)
    assert _rel(lse, want_lse) < 2e-5 and _rel(ce, want_ce) < 2e-5


@pytest.mark.parametrize("first", [np.nan, np.inf])
def test_first_entry_nan_or_inf_gives_the_reference_special_value(kernel_path, rng, first):
    z = rng.standard_normal((1, config.CPU_CHUNK + 3)).astype(np.float32)
    z[0, 0] = first
    lse, ce = _run(z, [1])
    want_lse = pn.logsumexp(z.astype(np.float64), backend="reference")
    np.testing.assert_array_equal(lse, want_lse)


def test_leading_masked_chunks(kernel_path, rng):
    v = 3 * config.CPU_CHUNK + 5
    z = rng.standard_normal((2, v)).astype(np.float32)
    z[:, : 2 * config.CPU_CHUNK + 1] = -np.inf
    lse, ce = _run(z, [v - 1, 2 * config.CPU_CHUNK + 1])
    want_lse, want_ce = _exact(z.astype(np.float64), [v - 1, 2 * config.CPU_CHUNK + 1])
    assert _rel(lse, want_lse) < 2e-5 and _rel(ce, want_ce) < 2e-5


@pytest.mark.parametrize("n_rows", [1, 2, 3, 5])
def test_row_split_matches_whole_rows(kernel_path, rng, n_rows, monkeypatch):
    v = 7 * config.CPU_MIN_SEGMENT + 123
    z = (rng.standard_normal((n_rows, v)) * 4 + 1e4).astype(np.float32)
    z[0, :: 7] = -np.inf
    labels = rng.integers(0, v, n_rows)
    labels[0] = 1
    assert cpu.pieces_per_row(n_rows, v, n_threads=8) > 1
    monkeypatch.setattr(cpu.numba, "get_num_threads", lambda: 8)  # force several pieces
    lse, ce = _run(z, labels)
    want_lse, want_ce = _exact(z.astype(np.float64), labels)
    assert _rel(lse, want_lse) < 2e-5 and _rel(ce, want_ce) < 2e-5


@pytest.mark.parametrize("offset", [1e6, -3e7, 2.5e9])
def test_float64_huge_offsets_keep_confident_ce_to_1e_10(kernel_path, rng, offset):
    # CE ~ 1e-7 on a 2.5e9 offset: the shift must be an exact float64 (see _avx2.constants' corr)
    z = rng.standard_normal((4, 3001))
    z[:, 7] += 25.0
    z += offset
    lse, ce = _run(z, [7] * 4)
    exact_ce = scipy_lse(z - z[:, 7:8], axis=1)  # z - z_y is exact: no cancellation in the reference
    assert np.all(np.abs(ce - exact_ce) <= 1e-10 * np.maximum(1.0, exact_ce))
    assert _rel(lse, scipy_lse(z, axis=1)) <= 1e-15


def test_pieces_per_row_policy():
    assert cpu.pieces_per_row(512, 128256, n_threads=2) == 1
    assert cpu.pieces_per_row(1, 262144, n_threads=2) == 8
    assert cpu.pieces_per_row(1, 1000, n_threads=2) == 1  # too short to split
    assert cpu.pieces_per_row(0, 1000, n_threads=2) == 1


def test_ignore_index_inside_vocab_range_is_guarded(rng):
    # a label equal to ignore_index is never used as an index, whatever its value
    z = rng.standard_normal((4, 10)).astype(np.float32)
    x, _, _ = _validate.as_host_logits(z)
    _, ce = _lse_ce(x, np.array([3, 3, 1, 3]), 3)
    assert ce[0] == ce[1] == ce[3] == 0.0
    assert np.isclose(ce[2], scipy_lse(z[2].astype(np.float64)) - z[2, 1], rtol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int8])
def test_stream_read_sums_every_byte(rng, dtype):
    # odd sizes leave a partial last word; the checksum is independent of the kernel's blocking
    z = rng.integers(0, 100, size=(5, 70001)).astype(dtype)
    raw = np.concatenate([z.reshape(-1).view(np.uint8), np.zeros(-z.nbytes % 8, np.uint8)])
    words = raw.view("<u8").astype(object)
    assert _bench_floor.stream_read(z) == int(words.sum()) % 2**64
    assert _bench_floor.stream_read(z[:, :0]) == 0


def test_kernel_is_loaded_from_cache_in_a_new_process(tmp_path):
    """A second process must load the compiled kernel from Numba's disk cache, not recompile."""
    script = textwrap.dedent(
        """
        import numpy as np, ptx_numba as pn
        from ptx_numba.cpu import rowpass, finish
        pn.cross_entropy(np.zeros((2, 3), np.float32), [0, 1], backend="cpu")
        kernels = (rowpass.plain_kernel, finish.finish_kernel)
        print(sum(len(d.stats.cache_hits) for d in kernels), sum(len(d.stats.cache_misses) for d in kernels))
        """
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    hits1, misses1 = map(int, first.stdout.split())
    hits2, misses2 = map(int, second.stdout.split())
    assert misses1 >= 1 and hits1 == 0  # the first process compiled
    assert hits2 >= 2 and misses2 == 0  # the second loaded both kernels from the cache


def test_isa_marker_kernel_loads_from_cache_in_a_new_process(tmp_path):
    """The walk is specialised on an ISA marker *type*: a fresh process must load, not compile.

    One kernel per ISA: each choice (and the older ``CPU_AVX2 = False`` switch) compiles once,
    and a second process with the same choice loads its own kernel from the cache.
    """
    from ptx_numba.cpu.simd import features

    script = textwrap.dedent(
        """
        import numpy as np
        from ptx_numba import config
        from ptx_numba.cpu import BACKEND, loop_isa, rowpass
        from ptx_numba._rowpass import StatsSpec
        config.CPU_ISA, config.CPU_AVX2 = %s
        BACKEND.row_stats(np.zeros((2, 3), np.float32), np.array([0, 1]), StatsSpec(target=True))
        d = rowpass.plain_kernel
        print(len(d.stats.cache_hits), len(d.stats.cache_misses), loop_isa(np.float32))
        """
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("PTX_NUMBA_CPU_ISA", None)
    choices = [(repr(name), None, name) for name in features.available()] + [("None", False, "portable")]
    for isa_name, avx2_flag, expected in choices:
        code = script % f"{isa_name}, {avx2_flag}"
        first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        hits, misses, ran = out.stdout.split()
        assert ran == expected and first.stdout.split()[2] == expected
        assert int(hits) >= 1 and int(misses) == 0, (isa_name, avx2_flag, out.stdout)


def test_isa_choice_from_config_and_environment(monkeypatch):
    from ptx_numba.cpu.simd import features, isa

    best = features.available()[0]
    monkeypatch.setattr(config, "CPU_ISA", None)
    monkeypatch.setattr(config, "CPU_AVX2", None)
    monkeypatch.delenv(config.CPU_ISA_ENV_VAR, raising=False)
    assert isa.for_dtype(np.dtype(np.float32)) is isa.BY_NAME[best]
    assert cpu.loop_isa(np.float32) == best
    monkeypatch.setenv(config.CPU_ISA_ENV_VAR, " Portable ")  # read at call time, case-insensitive
    assert cpu.loop_isa(np.float32) == "portable"
    monkeypatch.setenv(config.CPU_ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="PTX_NUMBA_CPU_ISA must be one of"):
        cpu.loop_isa(np.float32)
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="PTX_NUMBA_CPU_ISA"):
        pn.cross_entropy(x, [0, 1], backend="cpu")
    monkeypatch.setattr(config, "CPU_ISA", "portable")  # the config attribute wins over the variable
    assert cpu.loop_isa(np.float32) == "portable"
    monkeypatch.setattr(config, "CPU_ISA", "avx3")
    with pytest.raises(ValueError, match="config.CPU_ISA must be one of"):
        cpu.loop_isa(np.float32)
    monkeypatch.setattr(config, "CPU_ISA", best)
    monkeypatch.setattr(config, "CPU_AVX2", False)  # the older switch still means "portable"
    assert cpu.loop_isa(np.float64) == "portable"


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int8])
def test_stream_copy_copies_every_byte(rng, dtype):
    z = rng.integers(0, 100, size=(3, 70001)).astype(dtype)  # a partial last word
    out = np.zeros_like(z)
    _bench_floor.stream_copy(z, out)
    assert np.array_equal(out, z)
    with pytest.raises(ValueError, match="stream_copy"):
        _bench_floor.stream_copy(z, out[:, 1:])
