"""Shift arithmetic of the AVX2 loops (ptx_numba.cpu.simd.shift) in exact rationals and long double.

These run on every CPU: the constants are plain float arithmetic, whatever the loops can run on.
"""
from fractions import Fraction

import numpy as np
import pytest

from ptx_numba.cpu.simd import shift as _shift

_K8 = float(_shift.K8)


@pytest.mark.parametrize("shift", [0.0, 0.02, -1.0, 88.0, -3e4, 3e5, -3.6e5])
def test_shift_constants_pin_the_clamped_exponents(shift):
    m, ms, lo, hi, _ = _shift.shift_constants(np.float32(shift))
    s = round(m * _K8)
    assert abs(m - shift) <= 0.5 / _K8 + 1e-9 * abs(shift)
    assert float(ms) == _shift.MAGIC - s  # exact in float32
    assert round(float(lo) * _K8 - s) == -1016  # the lower clamp gives bits 0, i.e. exactly 0.0
    assert round(float(hi) * _K8 - s) <= 1023  # the upper clamp stays finite


@pytest.mark.parametrize("shift", [0.0, 0.02, -1.0, 700.0, -3e4, 1e9, -7e14])
def test_f64_shift_constants_pin_the_clamped_exponents(shift):
    m, ms, lo, hi, corr = _shift.shift_constants_f64(shift)
    k1 = np.longdouble(_shift.K1_F64)
    s = _shift.MAGIC64 - ms
    assert s == round(s) and abs(m - shift) <= 0.5 / float(k1) + 2.3e-16 * abs(shift)
    assert round(float(np.longdouble(lo) * k1 - np.longdouble(s))) == -1023  # bits 0: exactly 0.0
    assert round(float(np.longdouble(hi) * k1 - np.longdouble(s))) <= 1023  # the largest finite
    # corr moves a sum against the real S/K1 onto m: 2**(S - K1*m), the residual in exact rationals
    residual = Fraction(s) - Fraction(_shift.K1_F64) * Fraction(m)
    assert corr == pytest.approx(2.0 ** float(residual), rel=1e-15)
