"""The hand-written AVX2 exp-sum (ptx_numba.cpu.simd.avx2) against float64 NumPy.

Each term is checked through the public intrinsic itself: a one-element chunk is a 16-lane block
whose 15 padding lanes decode to -inf and must add exactly 0, so ``expsum(x[i:i+1])`` is term i.
"""
import math
import sys

import numpy as np
import pytest
from numba import njit

from ptx_numba.cpu.simd import avx2 as _avx2

pytestmark = pytest.mark.skipif(not _avx2.AVAILABLE, reason="the CPU lacks AVX2/FMA")

_K8 = float(_avx2.K8)


@njit(cache=False)
def _terms(chunk, shift):
    """Each element's term (one-element chunks), the shift ``m`` used and its correction factor.

    A float32 ``shift`` selects the float32 constants, a float64 one the float64 loop's.
    """
    m, k, ms, lo, hi, corr = _avx2.constants(shift)
    out = np.empty(chunk.size, dtype=np.float64)
    for i in range(chunk.size):
        out[i] = _avx2.expsum(chunk[i:i + 1], k, ms, lo, hi)
    return out, m, corr


@njit(cache=False)
def _chunk_sum(chunk, shift):
    m, k, ms, lo, hi, corr = _avx2.constants(shift)
    return _avx2.expsum(chunk, k, ms, lo, hi), m, corr


def _exact_terms(values64, m):
    """The documented function, exactly: 2**((x*K8 - S)/8) with S = m*K8 (x*K8 is exact in f64)."""
    s = round(m * _K8)
    return np.exp2((values64 * _K8 - s) / 8.0)


def _ulp_errors(got, exact):
    normal = exact >= 2.0**-126
    ulp = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    return np.abs(got[normal].astype(np.float64) - exact[normal]) / ulp


def _bf16(values32):
    return (values32.view(np.uint32) >> 16).astype(np.uint16)


def _bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("shift", [0.0, 1.0, -17.25, 300.0, -3e4, 1.25e5])
def test_terms_within_one_and_a_half_ulp(rng, shift):
    # every term whose result is a normal float32, from far below the shift up to the upper clamp
    # (x - m = 1023/K8 = 88.64; above it terms stay at 3.1e38 instead of overflowing)
    x = (shift + rng.uniform(-88.0, 88.5, 50_000)).astype(np.float32)
    got, m, _ = _terms(x, np.float32(shift))
    errors = _ulp_errors(got, _exact_terms(x.astype(np.float64), m))
    assert errors.size > 40_000 and errors.max() <= 1.5


def test_terms_for_every_float16_value():
    bits = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
    values = bits.view(np.float16).astype(np.float64)
    got, m, _ = _terms(bits, np.float32(3.0))
    below_clamp = np.isfinite(values) & (values < m + 88.5)
    exact = _exact_terms(values[below_clamp], m)
    assert _ulp_errors(got[below_clamp], exact).max() <= 1.5
    assert np.all((got[values > m + 88.7] > 3e38) & np.isfinite(got[values > m + 88.7]))
    assert np.all(got[values == -np.inf] == 0.0)
    assert np.all(np.isnan(got[np.isnan(values)]))


def test_terms_match_exp_of_the_distance_to_the_shift(rng):
    # exp(x - m) itself: the float32 rounding of 8/ln2 scales (x - m) by kappa = 1 - 1.3e-8
    x = rng.uniform(-40.0, 20.0, 20_000).astype(np.float32)
    got, m, _ = _terms(x, np.float32(2.5))
    d = x.astype(np.float64) - m
    rel = np.abs(got / np.exp(d) - 1.0)
    assert abs(_avx2.KAPPA_MINUS_ONE) < 1.4e-8
    assert np.all(rel <= 1.5 * 2.0**-23 + 1.4e-8 * np.abs(d))  # 1.5 ulp + the kappa term


def test_special_values_and_clamps():
    shift = np.float32(10.0)
    x = np.array([-np.inf, -1e30, 10.0 - 88.1, 10.0 - 87.0, 10.0, 10.0 + 88.0, 10.0 + 1e3, 3e38, np.inf,
                  np.nan], dtype=np.float32)
    got, m, _ = _terms(x, shift)
    assert got[0] == got[1] == got[2] == 0.0  # -inf and anything below the lower clamp: exactly 0
    assert 0.0 < got[3] < 2.0**-124
    assert got[4] == pytest.approx(math.exp(10.0 - m), rel=3e-7)
    assert got[5] == pytest.approx(_exact_terms(np.float64(98.0), m), rel=2e-7)
    assert np.all(np.isfinite(got[6:9])) and np.all(got[6:9] > 3.0e38)  # clamped, never inf
    assert np.isnan(got[9])


def test_never_nan_from_finite_input(rng):
    x = (rng.standard_normal(20_000) * 10.0 ** rng.uniform(0, 38, 20_000)).astype(np.float32)
    got, _, _ = _terms(x, np.float32(rng.uniform(-100, 100)))
    assert not np.isnan(got).any()


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 2047, 2048, 5003])
def test_chunk_sum_every_length_and_encoding(rng, n):
    x = (rng.standard_normal(n) * 4.0).astype(np.float32)
    x[rng.random(n) < 0.1] = -np.inf
    shift = np.float32(rng.uniform(-3, 3))
    encodings = {
        "float32": (x, x.astype(np.float64)),
        "bfloat16": (_bf16(x), _bf16_values(_bf16(x))),
        "float16": (x.astype(np.float16).view(np.int16), x.astype(np.float16).astype(np.float64)),
    }
    for name, (stored, values) in encodings.items():
        if name == "float16" and not _avx2.supports(np.dtype(np.int16)):
            continue
        got, m, _ = _chunk_sum(stored, shift)
        want = np.exp(values - m).sum()
        assert got == pytest.approx(want, rel=2e-6, abs=1e-30), name
    got, m, corr = _chunk_sum(x.astype(np.float64), np.float64(shift))
    assert corr * got == pytest.approx(np.exp(x.astype(np.float64) - m).sum(), rel=1e-13, abs=1e-300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses mprotect")
@pytest.mark.parametrize("n", [1, 5, 15, 16, 31, 32, 33])
def test_does_not_read_past_the_end(n):
    # A chunk ending exactly where an unreadable page starts: the partial last block is a masked
    # load, so this must not fault (a fault would kill the interpreter).
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(address + page, page, 0) == 0  # PROT_NONE
    try:
        for dtype, one in ((np.float32, 1.0), (np.float64, 1.0), (np.uint16, 0x3F80), (np.int16, 0x3C00)):
            if not _avx2.supports(np.dtype(dtype)):
                continue
            arr = np.frombuffer(buf, dtype=dtype, count=page // np.dtype(dtype).itemsize)
            arr[:] = one  # 1.0 in each encoding
            shift = np.float64(1.0) if dtype == np.float64 else np.float32(1.0)
            got, m, _ = _chunk_sum(arr[arr.size - n:], shift)
            assert got == pytest.approx(n * math.exp(1.0 - m), rel=1e-6), dtype
            del arr
    finally:
        libc.mprotect(address + page, page, 3)  # PROT_READ | PROT_WRITE, so munmap is clean


def test_supports():
    assert all(_avx2.supports(np.dtype(t)) for t in (np.float32, np.float64, np.uint16))
    assert not _avx2.supports(np.dtype(np.int32)) and not _avx2.supports(np.dtype(np.float16))


# --- float64 ---------------------------------------------------------------------------------
_KAPPA64_MINUS_ONE = float(np.longdouble(_avx2.K1_F64) * np.log(np.longdouble(2.0)) - 1)


def _exp_ld(values64, m):
    """``exp(x - m)`` in long double (x - m is exact: both are float64 and close)."""
    d = values64.astype(np.longdouble) - np.longdouble(m)
    return np.exp(d), d


@pytest.mark.parametrize("shift", [0.0, 1.0, -17.25, 650.0, -3e4, 1e6, -2.5e9, 1e13])
def test_f64_terms_match_exp_to_5e_14(rng, shift):
    # corr * term against exp(x - m): 5e-14 for the polynomial and roundings, plus the kappa term.
    # At 1e13 the shift's own rounding (|S/K1 - m| ~ 1e-3) would be a 1e-3 error without corr.
    x = shift + rng.uniform(-708.0, 708.0, 50_000)  # the upper clamp is at x - m = 709.09
    got, m, corr = _terms(x, np.float64(shift))
    exact, d = _exp_ld(x, m)
    normal = exact >= 2.0**-1020
    rel = np.abs(np.longdouble(corr) * got[normal] / exact[normal] - 1)
    assert normal.sum() > 40_000
    assert abs(_KAPPA64_MINUS_ONE) < 2.3e-16
    assert np.all(rel <= 5e-14 + 2.3e-16 * np.abs(d[normal]))


def test_f64_special_values_and_clamps():
    shift = 10.0
    x = np.array([-np.inf, -1e300, 10.0 - 710.0, 10.0 - 700.0, 10.0, 10.0 + 709.0, 10.0 + 1e4, 1e308, np.inf,
                  np.nan])
    got, m, corr = _terms(x, np.float64(shift))
    assert got[0] == got[1] == got[2] == 0.0  # -inf and anything below the lower clamp: exactly 0
    assert corr * got[3] == pytest.approx(math.exp(-700.0 + 10.0 - m), rel=1e-13)
    assert corr * got[4] == pytest.approx(math.exp(10.0 - m), rel=1e-14)
    assert np.all(np.isfinite(got[5:9])) and np.all(got[6:9] >= got[5])  # clamped, never inf
    assert np.isnan(got[9])


def test_f64_never_nan_from_finite_input(rng):
    x = rng.standard_normal(20_000) * 10.0 ** rng.uniform(0, 300, 20_000)
    got, _, _ = _terms(x, np.float64(rng.uniform(-1000, 1000)))
    assert not np.isnan(got).any()
