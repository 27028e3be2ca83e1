"""The CPU gradient pass (ptx_numba.cpu.BACKEND.row_grad) against the float64 reference.

The element formula is linear in the coefficients A..E, so random coefficients per row test every
term; the statistics come from the reference, so only the gradient pass is under test.
"""
import numpy as np
import pytest

from exact import cast
from ptx_numba import _validate, config
from ptx_numba._rowpass import GradCoef, StatsSpec
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64
from ptx_numba.reference import BACKEND as REFERENCE

cpu = pytest.importorskip("ptx_numba.cpu")
BACKEND = cpu.BACKEND

SPECS = {
    "plain": StatsSpec(target=True),
    "smooth_softcap": StatsSpec(target=True, dsum=True, softcap=30.0, inv_temperature=1.1),
    "entropy_temperature": StatsSpec(target=True, entropy=True, inv_temperature=1 / 0.7),
    "pair_target": StatsSpec(target=True, pair=True, inv_temperature=1.25),
}
#: out encoding for each logits encoding (and float32 gradients of 16-bit logits)
CASES = [("float32", np.float32), ("float64", np.float64), ("bfloat16", np.uint16),
         ("float16", np.int16), ("bfloat16", np.float32)]


def encode(z64, dtype):
    with np.errstate(invalid="ignore", over="ignore"):
        x, _, _ = _validate.as_host_logits(cast(z64, dtype))
    return x


def rows(rng, vocab):
    z = rng.standard_normal((8, vocab)) * 3
    z[1] += 3e4
    z[2] -= 3e4
    z[3, vocab // 2] += 60.0
    z[4, ::5] = -np.inf
    z[5] = 0.25
    return z


def coefficients(rng, n, pair):
    c = [rng.standard_normal(n) for _ in range(5)]
    if not pair:
        c[4] = None
    for values in c:
        if values is not None:
            values[6] = 0.0  # row 6: every coefficient 0 -> an all-zero gradient row
    return GradCoef(*c)


def decoded(out):
    """An output buffer's values in float64 (16-bit encodings decoded)."""
    return _validate.decode_to_float64(out)


def assert_grad_close(got, want, out_dtype):
    a, b = decoded(got), decoded(want)
    assert not np.isnan(a).any() and not np.isnan(b).any()
    finite = np.isfinite(b)  # +-inf where w is -inf under mass of p (an infinite KL)
    np.testing.assert_array_equal(a[~finite], b[~finite])
    a, b = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    if np.dtype(out_dtype).itemsize == 2:
        # within one unit in the last place of the 16-bit format: both round once, from values
        # that differ by float32 rounding, so a value near a midpoint may round either way
        eps = 2.0**-7 if out_dtype == np.uint16 else 2.0**-10
        tiny = 2.0**-133 if out_dtype == np.uint16 else 2.0**-24
        assert np.all(np.abs(a - b) <= eps * np.abs(b) + tiny)
    else:
        tol = TOL_FLOAT64 if out_dtype == np.float64 else TOL_FLOAT32
        scale = np.maximum(1.0, np.abs(b).max(axis=1, keepdims=True))
        assert np.all(np.abs(a - b) <= tol * scale)


@pytest.mark.parametrize("dtype,out_dtype", CASES)
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("vocab", [2 * 2048 + 37, 3])
def test_row_grad_matches_reference(rng, dtype, out_dtype, name, vocab):
    spec = SPECS[name]
    z = rows(rng, vocab)
    x = encode(z, dtype)
    w = encode(z[:, ::-1] * 0.5 + 1.0, dtype) if spec.pair else None
    y = rng.integers(0, vocab, len(z)).astype(np.int64)
    y[0] = -1
    y[4] = 0  # a label at a -inf logit
    stats = REFERENCE.row_stats(x, y, spec, w)
    coef = coefficients(rng, len(z), spec.pair)
    got = np.full(x.shape, 7, dtype=out_dtype)
    want = np.empty(x.shape, dtype=out_dtype)
    BACKEND.row_grad(x, y, spec, stats, coef, got, w)
    REFERENCE.row_grad(x, y, spec, stats, coef, want, w)
    assert_grad_close(got, want, out_dtype)
    assert np.all(decoded(got)[6] == 0.0)


@pytest.mark.parametrize("dtype,out_dtype", [("float32", np.float32), ("bfloat16", np.uint16), ("float16", np.int16)])
def test_out_may_alias_x_and_strided_rows(rng, dtype, out_dtype):
    spec = SPECS["plain"]
    z = rows(rng, 3001)
    base = encode(z, dtype)
    y = rng.integers(0, 3001, len(z)).astype(np.int64)
    stats = REFERENCE.row_stats(base, y, spec)
    coef = GradCoef(A=np.ones(len(z)), C=-np.ones(len(z)))
    want = np.empty(base.shape, dtype=out_dtype)
    REFERENCE.row_grad(base, y, spec, stats, coef, want)
    inplace = base.copy()
    BACKEND.row_grad(inplace, y, spec, stats, coef, inplace)  # out is x
    assert_grad_close(inplace, want, out_dtype)
    # strided: rows of a wider buffer, written into the rows of another
    wide = np.zeros((len(z), 3005), dtype=base.dtype)
    wide[:, 2:3003] = base
    out_wide = np.zeros((len(z), 3010), dtype=out_dtype)
    BACKEND.row_grad(wide[:, 2:3003], y, spec, stats, coef, out_wide[:, 5:3006])
    assert_grad_close(out_wide[:, 5:3006], want, out_dtype)
    assert np.all(out_wide[:, :5] == 0) and np.all(out_wide[:, 3006:] == 0)  # nothing written outside


def test_label_entry_keeps_p_minus_one_in_bfloat16():
    # p_y = 1 - 3e-4, within a bfloat16 ulp of 1: rounding p_y first would give a 0 gradient
    z = np.zeros((1, 1000))
    z[0, 3] = 15.0
    x = encode(z, "bfloat16")
    y = np.array([3])
    stats = REFERENCE.row_stats(x, y, SPECS["plain"])
    out = np.empty(x.shape, np.uint16)
    BACKEND.row_grad(x, y, SPECS["plain"], stats, GradCoef(A=np.ones(1), C=-np.ones(1)), out)
    exact = 1.0 / (1.0 + 999.0 * np.exp(-15.0)) - 1.0
    assert -4e-4 < exact < -2e-4
    assert abs(decoded(out)[0, 3] - exact) <= 2.0**-8 * abs(exact)


def test_bad_out_raises_value_errors():
    x = np.zeros((2, 5), np.float32)
    y = np.zeros(2, np.int64)
    stats = REFERENCE.row_stats(x, y, SPECS["plain"])
    coef = GradCoef(A=np.ones(2))
    with pytest.raises(ValueError, match="shape"):
        BACKEND.row_grad(x, y, SPECS["plain"], stats, coef, np.zeros((2, 4), np.float32))
    ro = np.zeros((2, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        BACKEND.row_grad(x, y, SPECS["plain"], stats, coef, ro)
    with pytest.raises(ValueError, match="dtype"):
        BACKEND.row_grad(x, y, SPECS["plain"], stats, coef, np.zeros((2, 5), np.int32))


@pytest.mark.parametrize("dtype,out_dtype", CASES)
@pytest.mark.parametrize("name", ["plain", "entropy_temperature", "pair_target"])
def test_shift_off_the_float32_grid_keeps_its_low_part(rng, dtype, out_dtype, name):
    # The forward's shift is a float64 that is no float32 value (the AVX2 walk's S/K8); at an
    # offset of 3e4 its float32 rounding alone is up to 1e-3, so the pass must carry the low part
    # (fast-math reassociation of (z - mh) - ml into z - (mh + ml) would drop it).
    spec = SPECS[name]
    z = rng.standard_normal((4, 2 * 2048 + 37)) * 2
    z[:, 11] += 6.0  # a dominant logit: p near 1 turns a shift error into a gradient error
    z[0] += 3e4
    z[1] -= 3e4
    z[2] += 1234.567
    x = encode(z, dtype)
    w = encode(z[:, ::-1] * 0.5 + 1.0, dtype) if spec.pair else None
    y = np.array([11, 3, 11, 7], dtype=np.int64)
    stats = REFERENCE.row_stats(x, y, spec, w)
    # move m by 0.37 of a float32 ulp (s moves with it): the exact gradient does not change
    step = 0.37 * np.spacing(np.abs(stats.m).astype(np.float32)).astype(np.float64)
    stats = stats._replace(m=stats.m + step, s=stats.s * np.exp(-step))
    coef = GradCoef(A=np.ones(4), C=-np.ones(4), B=rng.standard_normal(4) if spec.entropy else None,
                    E=rng.standard_normal(4) if spec.pair else None)
    got = np.empty(x.shape, dtype=out_dtype)
    want = np.empty(x.shape, dtype=out_dtype)
    BACKEND.row_grad(x, y, spec, stats, coef, got, w)
    REFERENCE.row_grad(x, y, spec, stats, coef, want, w)
    assert_grad_close(got, want, out_dtype)


# --- the hand-written loop (rows with A, C, D only: cross entropy, z-loss, label smoothing) ----
FAST_CASES = [("float32", np.float32), ("bfloat16", np.uint16), ("float16", np.int16), ("bfloat16", np.float32),
              ("float16", np.float32), ("float32", np.uint16), ("float32", np.int16), ("float16", np.uint16)]


@pytest.fixture(params=["avx2", "portable"])
def loop(request, monkeypatch):
    """The hand-written loop where the host has AVX2, and the portable one."""
    from ptx_numba.cpu.simd import avx2

    if request.param == "avx2" and not avx2.AVAILABLE:
        pytest.skip("the AVX2 loop does not run on this CPU")
    monkeypatch.setattr(config, "CPU_AVX2", None if request.param == "avx2" else False)
    return request.param


@pytest.mark.parametrize("dtype,out_dtype", FAST_CASES)
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 2 * 2048 + 37])
def test_rows_without_b_and_e_terms(loop, rng, dtype, out_dtype, vocab):
    spec = SPECS["plain"]
    z = rows(rng, vocab)
    x = encode(z, dtype)
    y = rng.integers(0, vocab, len(z)).astype(np.int64)
    y[0] = -1
    y[4] = 0  # a label at a -inf logit
    stats = REFERENCE.row_stats(x, y, spec)
    n = len(z)
    coef = GradCoef(A=rng.uniform(0.5, 2.0, n), C=-rng.uniform(0.5, 2.0, n), D=rng.standard_normal(n) * 1e-3)
    coef.A[6] = coef.C[6] = coef.D[6] = 0.0  # an all-zero row
    got = np.full((n, vocab + 7), 7, dtype=out_dtype)[:, 3:vocab + 3]  # strided, padded rows
    want = np.empty(x.shape, dtype=out_dtype)
    BACKEND.row_grad(x, y, spec, stats, coef, got, None)
    REFERENCE.row_grad(x, y, spec, stats, coef, want, None)
    assert_grad_close(got, want, out_dtype)
    assert np.all(decoded(got)[6] == 0.0)
    base = got.base
    assert np.all(base[:, :3] == 7) and np.all(base[:, vocab + 3:] == 7)  # nothing written outside


@pytest.mark.parametrize("dtype,out_dtype", [("float32", np.float32), ("bfloat16", np.uint16), ("float16", np.int16)])
def test_rows_without_b_and_e_terms_special_values(loop, rng, dtype, out_dtype):
    # NaN and +inf rows (canonical stats: s NaN or m inf) and a shift past the loop's range take
    # the portable path; in place (out is x) every element is read before it is written
    spec = SPECS["plain"]
    z = rng.standard_normal((5, 2049)) * 2
    z[0, 7] = np.nan
    z[1, 9] = np.inf
    z[2] += 5e5 if dtype == "float32" else 0.0
    z[3, :] = -np.inf
    z[3, 100] = 1.0
    z[4, ::2] = -np.inf
    x = encode(z, dtype)
    y = np.array([1, 2, 3, 100, 1], dtype=np.int64)
    stats = REFERENCE.row_stats(x, y, spec)
    coef = GradCoef(A=np.ones(5), C=-np.ones(5))
    want = np.empty(x.shape, dtype=out_dtype)
    with np.errstate(invalid="ignore"):
        REFERENCE.row_grad(x, y, spec, stats, coef, want, None)
    got = x.copy() if np.dtype(out_dtype) == x.dtype else np.empty(x.shape, dtype=out_dtype)
    BACKEND.row_grad(got if got.dtype == x.dtype else x, y, spec, stats, coef, got, None)
    a, b = decoded(got), decoded(want)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert_grad_close(got[2:], want[2:], out_dtype)
