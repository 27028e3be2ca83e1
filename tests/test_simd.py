"""The vectorizable primitives in ptx_numba.cpu.simd.primitives against NumPy float64 / exact decoding."""
import numpy as np
import pytest
from numba import njit

from ptx_numba.cpu.simd import primitives as _simd


@njit(cache=False)
def _map_exp(values):
    out = np.empty_like(values)
    for i in range(values.size):
        out[i] = _simd.fast_exp(values[i])
    return out


def _float32_mapper(decoder):
    """A jitted loop applying a Numba-only ``decoder`` to every element, into float32."""

    @njit(cache=False)
    def apply(bits):
        out = np.empty(bits.size, dtype=np.float32)
        for i in range(bits.size):
            out[i] = decoder(bits[i])
        return out

    return apply


_map_decode = _float32_mapper(_simd.decode)
_map_f16_portable = _float32_mapper(_simd._f16_to_f32)


def _ulp_error_f32(x):
    got = _map_exp(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    return np.abs(got - exact) / ulp


def test_exp_f32_within_about_one_ulp_over_the_normal_range(rng):
    # every result between FLT_MIN and FLT_MAX, dense sweep plus random points
    grid = np.linspace(-87.3, 88.3, 1_000_001, dtype=np.float32)
    random = rng.uniform(-87.3, 88.3, 200_000).astype(np.float32)
    err = _ulp_error_f32(np.concatenate([grid, random]))
    assert err.max() <= 1.5, err.max()


def test_exp_f32_special_values():
    x = np.array([-np.inf, -1e30, -100.0, -88.5, 0.0, 100.0, np.inf, np.nan], dtype=np.float32)
    got = _map_exp(x)
    assert got[0] == 0.0 and got[1] == 0.0 and got[2] == 0.0 and got[3] == 0.0
    assert got[4] == 1.0
    assert np.isposinf(got[5]) and np.isposinf(got[6])
    assert np.isnan(got[7])


def test_exp_f32_never_nan_from_finite(rng):
    x = rng.uniform(-3e38, 3e38, 100_000).astype(np.float32)
    assert not np.isnan(_map_exp(x)).any()


def test_exp_f64_accuracy(rng):
    x = np.concatenate([np.linspace(-700, 709, 500_001), rng.uniform(-30, 30, 100_000)])
    got = _map_exp(x)
    exact = np.exp(x)
    assert np.max(np.abs(got / exact - 1)) < 1e-15


def test_exp_f64_special_values():
    got = _map_exp(np.array([-np.inf, -1000.0, 0.0, 1000.0, np.inf, np.nan]))
    assert got[0] == 0.0 and got[1] == 0.0 and got[2] == 1.0
    assert np.isposinf(got[3]) and np.isposinf(got[4]) and np.isnan(got[5])


@pytest.mark.parametrize("decoder", ["decode", "portable"])
def test_decode_every_float16_bit_pattern(decoder):
    # "decode" is the path the kernels use (the CPU's half->float instruction where it has one);
    # "portable" is the bit-manipulating fallback for CPUs without one. Both must be exact.
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    got = _map_decode(bits) if decoder == "decode" else _map_f16_portable(bits)
    want = bits.view(np.float16).astype(np.float32)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite]).all()
    # signed zeros and subnormals keep their sign
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


def test_decode_every_bfloat16_bit_pattern():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _map_decode(bits)
    want = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite]).all()
