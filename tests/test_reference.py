"""The NumPy reference backend against an independent float64 computation and scipy.

The reference is the executable spec every other backend is compared with, so it is checked here
against (a) a row-by-row log-sum-exp written in this file with ``math.fsum`` (exactly rounded sums,
no shared code with the package) and (b) :func:`scipy.special.logsumexp`.
"""
import math
import warnings

import ml_dtypes
import numpy as np
import pytest
import scipy.special

import ptx_numba as pn
from ptx_numba import reference
from ptx_numba._validate import prepare_host

TOL64 = 1e-12  # reference vs an exactly rounded float64 computation, relative to max(1, |exact|)


# ------------------------------------------------------------------------------------------
# independent helpers
# ------------------------------------------------------------------------------------------
def exact_lse_row(row):
    """log(sum(exp(row))) in float64 with an exactly rounded sum; scipy's special values."""
    row = np.asarray(row, dtype=np.float64)
    if np.isnan(row).any():
        return math.nan
    if np.isposinf(row).any():
        return math.inf
    m = float(row.max())
    if m == -math.inf:
        return -math.inf
    return m + math.log(math.fsum(math.exp(float(v) - m) for v in row))


def exact_lse(z):
    z = np.asarray(z, dtype=np.float64)
    flat = z.reshape(-1, z.shape[-1])
    return np.array([exact_lse_row(r) for r in flat], dtype=np.float64).reshape(z.shape[:-1])


def exact_ce(z, labels, ignore_index=-100):
    z = np.asarray(z, dtype=np.float64)
    flat = z.reshape(-1, z.shape[-1])
    y = np.asarray(labels).reshape(-1)
    out = np.zeros(flat.shape[0])
    for i, (row, lab) in enumerate(zip(flat, y)):
        if lab != ignore_index and np.isfinite(row[lab]):
            # lse(z - z_y): z - z_y is exact for nearby values, where lse(z) - z_y would cancel
            out[i] = exact_lse_row(row - row[lab])
        elif lab != ignore_index:
            out[i] = exact_lse_row(row) - row[lab]
    return out.reshape(np.shape(labels))


def scipy_lse(z):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return scipy.special.logsumexp(np.asarray(z, dtype=np.float64), axis=-1)


def assert_rel_close(got, want, tol, what=""):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    special = ~np.isfinite(want)
    np.testing.assert_array_equal(got[special], want[special], err_msg=f"{what}: special values")
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    err = np.where(special, 0.0, err)
    worst = int(np.argmax(err)) if err.size else 0
    assert not err.size or err.max() <= tol, (
        f"{what}: row {np.unravel_index(worst, err.shape)} rel err {err.max():.3g} > {tol:g}; "
        f"got {got.ravel()[worst]!r} want {want.ravel()[worst]!r}"
    )


def random_logits(rng, n, v, *, scale=3.0, offset=0.0):
    return rng.normal(0.0, scale, size=(n, v)) + offset


def encoded(z):
    """The reference's input form: the validated, encoded [N, V] batch."""
    return prepare_host(z, None, -100).logits


# ------------------------------------------------------------------------------------------
# the helpers themselves (so that a bug there cannot hide one in the reference)
# ------------------------------------------------------------------------------------------
def test_independent_helper_agrees_with_scipy(rng):
    z = random_logits(rng, 7, 40, scale=5.0)
    assert_rel_close(exact_lse(z), scipy_lse(z), 1e-13, "helper vs scipy")
    # closed form: V equal entries c -> c + log(V)
    assert exact_lse_row(np.full(9, 2.5)) == pytest.approx(2.5 + math.log(9), rel=1e-15)


# ------------------------------------------------------------------------------------------
# logsumexp_rows
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [1, 2, 7, 33, 1000, 2049])
@pytest.mark.parametrize("offset", [0.0, 3e4, -3e4])
def test_lse_rows_match_independent_and_scipy(rng, v, offset):
    z = random_logits(rng, 5, v, scale=4.0, offset=offset)
    got = reference.logsumexp_rows(encoded(z))
    assert got.dtype == np.float64 and got.shape == (5,)
    assert_rel_close(got, exact_lse(z), TOL64, "vs fsum")
    assert_rel_close(got, scipy_lse(z), TOL64, "vs scipy")


def test_lse_rows_spike_constant_and_neg_inf(rng):
    z = random_logits(rng, 4, 50)
    z[0, 17] += 60.0  # one logit far above the rest
    z[1, :] = -7.25  # a constant row: lse = c + log(V)
    z[2, rng.choice(50, 30, replace=False)] = -np.inf  # masked entries
    z[3, :49] = -np.inf  # a single finite entry: lse = that entry
    got = reference.logsumexp_rows(encoded(z))
    assert_rel_close(got, exact_lse(z), TOL64, "fsum")
    assert_rel_close(got, scipy_lse(z), TOL64, "scipy")
    assert got[1] == pytest.approx(-7.25 + math.log(50), rel=1e-14)
    assert got[3] == z[3, 49]


@pytest.mark.parametrize(
    "row",
    [
        [-np.inf, -np.inf, -np.inf],
        [np.inf, 0.0, 1.0],
        [np.inf, -np.inf, 3.0],
        [np.inf, np.inf, 0.0],
        [np.nan, 0.0, 1.0],
        [np.nan, np.inf, 0.0],
        [np.nan, -np.inf, -np.inf],
        [-np.inf, 5.0, -np.inf],
        [-np.inf],
        [np.inf],
        [np.nan],
    ],
    ids=str,
)
def test_lse_special_values_match_scipy(row):
    z = np.array([row, np.zeros(len(row))], dtype=np.float64)
    got = reference.logsumexp_rows(encoded(z))
    want = scipy_lse(z)
    np.testing.assert_array_equal(got, want)  # NaN == NaN here, inf exact
    assert got[1] == pytest.approx(math.log(len(row)), rel=1e-15)


def test_lse_special_values_in_narrow_encodings():
    rows = np.array([[-np.inf, -np.inf], [np.inf, 1.0], [np.nan, 1.0], [-np.inf, 2.0]])
    want = scipy_lse(rows)
    for cast in (np.float32, np.float16, ml_dtypes.bfloat16):
        got = reference.logsumexp_rows(encoded(rows.astype(cast)))
        np.testing.assert_array_equal(got, want, err_msg=str(cast))


def test_lse_empty_batch():
    got = reference.logsumexp_rows(encoded(np.zeros((0, 4))))
    assert got.shape == (0,) and got.dtype == np.float64


# ------------------------------------------------------------------------------------------
# cross_entropy_rows / cross_entropy_sum
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [1, 2, 7, 33, 1000])
def test_ce_rows_match_independent(rng, v):
    n = 9
    z = random_logits(rng, n, v, scale=3.0, offset=float(rng.choice([0.0, 3e4, -3e4])))
    y = rng.integers(0, v, size=n)
    y[[2, 5]] = -100
    got = reference.cross_entropy_rows(encoded(z), y.astype(np.int64), -100)
    assert got.dtype == np.float64 and got.shape == (n,)
    assert_rel_close(got, exact_ce(z, y), TOL64, "ce rows")
    assert got[2] == 0.0 and got[5] == 0.0
    # against scipy's lse too: ce = lse - z[y]
    valid = y != -100
    via_scipy = scipy_lse(z)[valid] - z[valid, y[valid]]
    assert_rel_close(got[valid], via_scipy, 1e-10, "ce vs scipy")
    if v == 1:
        np.testing.assert_array_equal(got, 0.0)  # one class: probability 1


def test_ce_sum_and_count(rng):
    z = random_logits(rng, 11, 20)
    y = rng.integers(0, 20, size=11)
    y[[0, 3, 4]] = 7  # a custom ignore_index that is also a valid class
    total, count = reference.cross_entropy_sum(encoded(z), y.astype(np.int64), 7)
    want = exact_ce(z, y, ignore_index=7)
    assert count == int(np.count_nonzero(y != 7))
    assert total == pytest.approx(math.fsum(want), rel=1e-12)
    assert isinstance(count, int)


def test_ce_sum_no_valid_rows():
    z = np.ones((3, 4))
    assert reference.cross_entropy_sum(encoded(z), np.full(3, -100, np.int64), -100) == (0.0, 0)
    assert reference.cross_entropy_sum(encoded(np.ones((0, 4))), np.zeros(0, np.int64), -100) == (0.0, 0)


def test_ce_special_values():
    z = np.array(
        [
            [-np.inf, 1.0, 2.0],  # label on a masked entry -> +inf
            [np.nan, 1.0, 2.0],  # NaN propagates
            [np.nan, np.nan, np.nan],  # ignored row: 0 whatever it holds
            [-np.inf, -np.inf, 0.0],  # a single finite entry, labelled: ce 0
        ]
    )
    y = np.array([0, 1, -100, 2], dtype=np.int64)
    with np.errstate(all="raise"):  # the reference must not trip floating-point warnings
        got = reference.cross_entropy_rows(encoded(z), y, -100)
    assert got[0] == np.inf
    assert np.isnan(got[1])
    assert got[2] == 0.0
    assert got[3] == 0.0


def test_ce_shift_invariance(rng):
    z = random_logits(rng, 6, 30)
    y = rng.integers(0, 30, 6).astype(np.int64)
    base = reference.cross_entropy_rows(encoded(z), y, -100)
    shifted = reference.cross_entropy_rows(encoded(z + rng.uniform(-3e4, 3e4, (6, 1))), y, -100)
    # z + c rounds each entry by up to ulp(3e4)/2 ~ 2e-12; the difference must stay at that level
    assert_rel_close(shifted, base, 1e-10, "shifted")


def test_narrow_encodings_are_computed_from_their_exact_values(rng):
    """float32/float16/bf16 input: the reference computes in float64 on the decoded values."""
    z = random_logits(rng, 5, 64, scale=2.0)
    y = rng.integers(0, 64, 5).astype(np.int64)
    for cast in (np.float32, np.float16, ml_dtypes.bfloat16):
        narrow = z.astype(cast)
        values = narrow.astype(np.float64)
        enc = encoded(narrow)
        assert_rel_close(reference.logsumexp_rows(enc), exact_lse(values), TOL64, str(cast))
        assert_rel_close(reference.cross_entropy_rows(enc, y, -100), exact_ce(values, y), TOL64, str(cast))


def test_reference_does_not_modify_its_input(rng):
    z = random_logits(rng, 4, 10)
    z[0, 0] = -np.inf
    enc = encoded(z)
    before = enc.copy()
    y = np.array([1, -100, 3, 0], dtype=np.int64)
    y_before = y.copy()
    reference.logsumexp_rows(enc)
    reference.cross_entropy_rows(enc, y, -100)
    reference.cross_entropy_sum(enc, y, -100)
    np.testing.assert_array_equal(enc, before)
    np.testing.assert_array_equal(y, y_before)


def test_public_api_on_reference_backend(rng):
    z = random_logits(rng, 2 * 3, 17).reshape(2, 3, 17)
    y = rng.integers(0, 17, size=(2, 3))
    y[0, 1] = -100
    assert_rel_close(pn.logsumexp(z, backend="reference"), exact_lse(z), TOL64, "lse")
    assert_rel_close(pn.cross_entropy(z, y, reduction="none", backend="reference"), exact_ce(z, y), TOL64, "none")
    want = exact_ce(z, y)
    assert pn.cross_entropy(z, y, reduction="sum", backend="reference") == pytest.approx(math.fsum(want.ravel()), rel=1e-12)
    assert pn.cross_entropy(z, y, backend="reference") == pytest.approx(math.fsum(want.ravel()) / 5, rel=1e-12)
