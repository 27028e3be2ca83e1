"""Property tests: random shapes, dtypes, offsets, masks and ignored rows.

Every host backend must agree with float64 scipy within the numerics contract; the reduction and
``ptx_loss`` relations must hold; CE is shift invariant and non-negative on finite rows.
"""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptx_numba as pn
from exact import cast, ce64, lse64, rel_error
from ptx_numba.contract import TOL_FLOAT64, tolerance

HOST_BACKENDS = [b for b in pn.available_backends() if b != "cuda"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw, dtypes=DTYPES, allow_neg_inf=True):
    """(logits, labels, dtype, ignore_index): finite except for optional -inf masks."""
    dtype = draw(st.sampled_from(dtypes))
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 40))
    v = draw(st.one_of(st.integers(1, 12), st.integers(13, 300), st.sampled_from([2047, 2048, 2049, 4100])))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 1e3, -1e3, 3e4, -3e4]))
    per_row_offsets = draw(st.booleans())
    spike = draw(st.sampled_from([0.0, 60.0]))
    mask_p = draw(st.sampled_from([0.0, 0.3, 0.9])) if allow_neg_inf else 0.0
    ignore_p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (v,)
    z = rng.normal(0.0, 1.0, size=shape) * scale + offset
    if per_row_offsets:
        z += rng.uniform(-3e4, 3e4, size=tuple(lead) + (1,))
    labels = rng.integers(0, v, size=tuple(lead))
    if spike:
        np.put_along_axis(z, rng.integers(0, v, size=tuple(lead) + (1,)), spike + z.max(initial=0.0), axis=-1)
    if mask_p:
        mask = rng.random(shape) < mask_p
        np.put_along_axis(mask, labels[..., None], False, axis=-1)  # the label keeps a finite logit
        z[mask] = -np.inf
    labels[rng.random(tuple(lead)) < ignore_p] = ignore_index
    if ignore_index == 0:
        labels[labels == 0] = ignore_index  # class 0 is the ignore marker: fine, still ignored
    z = np.clip(z, -6e4, 6e4)  # stays inside float16's range
    return cast(z, dtype), labels, dtype, ignore_index


@settings(max_examples=200, **SETTINGS)
@given(batches())
def test_backends_agree_with_float64(batch):
    z, y, dtype, ii = batch
    tol = tolerance(dtype)
    want_lse, want_ce = lse64(z), ce64(z, y, ii)
    valid = y != ii
    for backend in HOST_BACKENDS:
        lse = pn.logsumexp(z, backend=backend)
        assert lse.shape == y.shape
        assert rel_error(lse, want_lse) <= tol, (backend, "lse")
        rows = pn.cross_entropy(z, y, ignore_index=ii, reduction="none", backend=backend)
        assert rows.shape == y.shape and rows.dtype == (np.float64 if dtype == "float64" else np.float32)
        assert rel_error(rows, want_ce) <= tol, (backend, "ce")
        assert (rows[~valid] == 0.0).all()
        s = pn.cross_entropy(z, y, ignore_index=ii, reduction="sum", backend=backend)
        bound = tol * float(np.maximum(1.0, np.abs(want_ce[valid])).sum())
        assert abs(s - math.fsum(want_ce[valid])) <= bound, (backend, "sum")


@settings(max_examples=120, **SETTINGS)
@given(batches(allow_neg_inf=False), st.floats(-10, 10), st.floats(-1e3, 1e3))
def test_reduction_and_ptx_relations(batch, beta, rl):
    z, y, dtype, ii = batch
    count = int(np.count_nonzero(y != ii))
    for backend in HOST_BACKENDS:
        rows = pn.cross_entropy(z, y, ignore_index=ii, reduction="none", backend=backend)
        s = pn.cross_entropy(z, y, ignore_index=ii, reduction="sum", backend=backend)
        m = pn.cross_entropy(z, y, ignore_index=ii, reduction="mean", backend=backend)
        assert type(s) is float and type(m) is float
        # sum("none") == "sum": rows are rounded to the output dtype, so allow that rounding
        eps = np.finfo(rows.dtype).eps
        assert abs(math.fsum(rows.astype(np.float64).ravel()) - s) <= 4 * eps * (np.abs(rows).sum() + 1) + 1e-12
        if count:
            assert m == pytest.approx(s / count, rel=1e-12, abs=1e-300)
        else:
            assert m == 0.0 and s == 0.0
        # ce >= 0 on finite rows, up to the error of a zero loss: rounding for float32 output; for
        # float64 the AVX2 loop's terms (within 5e-14 of exp, tests/test_avx2.py), so a one-entry
        # row can come out at -2e-15
        floor = 1e-13 if rows.dtype == np.float64 else 4 * eps
        assert (rows >= -floor * np.maximum(1.0, np.abs(lse64(z)))).all()
        r = pn.ptx_loss(rl, z, y, beta, ignore_index=ii, backend=backend)
        assert r.ce == pytest.approx(m, rel=1e-12, abs=1e-300)
        assert r.ptx == beta * r.ce
        assert r.total == rl + r.ptx
        if not count:
            assert tuple(r) == (rl + 0.0, 0.0, 0.0)


@settings(max_examples=100, **SETTINGS)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.integers(1, 500),
    st.sampled_from([1.0, 10.0, 100.0]),
    st.sampled_from([0.5, -7.0, 1024.0, -3e4, 3e4]),
)
def test_ce_shift_invariant_float64(seed, n, v, scale, shift):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, size=(n, v))
    y = rng.integers(0, v, size=n)
    c = shift * rng.integers(1, 4, size=(n, 1))
    zc = z + c
    for backend in HOST_BACKENDS:
        base = pn.cross_entropy(z, y, reduction="none", backend=backend)
        moved = pn.cross_entropy(zc, y, reduction="none", backend=backend)
        # z + c itself rounds each entry by <= ulp(|z| + |c|) / 2; the CE may move by that much
        slack = 4 * np.spacing(np.abs(zc).max()) + TOL_FLOAT64 * np.maximum(1.0, np.abs(base))
        assert (np.abs(moved - base) <= slack).all(), backend
        # and the LSE moves by exactly the constant (to the same rounding)
        lse, lse_c = pn.logsumexp(z, backend=backend), pn.logsumexp(zc, backend=backend)
        assert (np.abs((lse_c - lse) - c[:, 0]) <= slack + TOL_FLOAT64 * np.abs(lse_c)).all(), backend


@settings(max_examples=60, **SETTINGS)
@given(batches(dtypes=["float32", "float64"], allow_neg_inf=False))
def test_backends_agree_with_each_other(batch):
    z, y, dtype, ii = batch
    tol = tolerance(dtype)
    results = [pn.cross_entropy(z, y, ignore_index=ii, reduction="none", backend=b) for b in HOST_BACKENDS]
    for other in results[1:]:
        # each is within tol of float64, so within 2*tol of each other
        assert rel_error(other, results[0]) <= 2 * tol + 1e-7
