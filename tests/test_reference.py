"""The float64 reference backend (``ptx_numba.reference.BACKEND``) against independent float64
computations: row by row with ``math.fsum`` (exactly rounded sums, no code shared with the
package), :mod:`scipy.special`, and PyTorch autograd in float64 for the gradient pass.

The reference is the executable spec every other backend is compared with, so each
:class:`~ptx_numba._rowpass.RowStats` field is checked against its definition in
:mod:`ptx_numba._rowpass`, and the canonical special values are checked one by one.
"""
import math
import warnings

import ml_dtypes
import numpy as np
import pytest

from exact import assert_close, entropy64, kl64, lse64
from ptx_numba import _finish, config, reference
from ptx_numba._rowpass import GradCoef, StatsSpec
from ptx_numba._validate import BF16, F16, as_host_logits, decode_to_float64, encode_from_float64
from ptx_numba.contract import TOL_FLOAT64

BACKEND = reference.BACKEND
FULL = StatsSpec(target=True, entropy=True, dsum=True, pair=True)


# ------------------------------------------------------------------------------------------
# independent helpers
# ------------------------------------------------------------------------------------------
def encoded(z):
    """The backend's input form: the validated, encoded [N, V] block."""
    return as_host_logits(z)[0]


def transformed(z, spec):
    """``z'`` in float64, written out here (temperature, then softcap)."""
    z = np.asarray(z, dtype=np.float64) * spec.inv_temperature
    return spec.softcap * np.tanh(z / spec.softcap) if spec.softcap else z


def fsum_stats(z, w, y, m, m_w):
    """s, t, d, s_w, u of finite rows from their definitions, relative to the backend's shifts."""
    out = {k: [] for k in ("s", "t", "d", "s_w", "u")}
    for i in range(z.shape[0]):
        rel = [float(v) - m[i] for v in z[i]]
        rel_w = [float(v) - m_w[i] for v in w[i]]
        e = [math.exp(r) for r in rel]
        out["s"].append(math.fsum(e))
        out["t"].append(math.fsum(a * r for a, r in zip(e, rel) if a > 0))
        out["d"].append(math.fsum(rel))
        out["s_w"].append(math.fsum(math.exp(r) for r in rel_w))
        out["u"].append(math.fsum(a * (r - q) for a, r, q in zip(e, rel, rel_w) if a > 0))
    return {k: np.array(v) for k, v in out.items()}


def random_logits(rng, n, v, *, scale=3.0, offset=0.0):
    return rng.normal(0.0, scale, size=(n, v)) + offset


SPECS = {
    "plain": StatsSpec(target=True, entropy=True, dsum=True, pair=True),
    "temperature": StatsSpec(inv_temperature=1 / 0.7, target=True, entropy=True, dsum=True, pair=True),
    "softcap": StatsSpec(softcap=4.0, target=True, entropy=True, dsum=True, pair=True),
    "both": StatsSpec(inv_temperature=2.5, softcap=6.0, target=True, entropy=True, dsum=True, pair=True),
}


# ------------------------------------------------------------------------------------------
# the helpers themselves (so that a bug there cannot hide one in the reference)
# ------------------------------------------------------------------------------------------
def test_independent_helpers_agree_with_scipy(rng):
    z, w = random_logits(rng, 6, 40, scale=4.0), random_logits(rng, 6, 40)
    m, m_w = z.max(axis=1), w.max(axis=1)
    f = fsum_stats(z, w, None, m, m_w)
    assert_close(m + np.log(f["s"]), lse64(z), TOL_FLOAT64, "lse")
    assert_close(np.log(f["s"]) - f["t"] / f["s"], entropy64(z), TOL_FLOAT64, "entropy")
    assert_close(f["u"] / f["s"] - np.log(f["s"]) + np.log(f["s_w"]), kl64(z, w), TOL_FLOAT64, "kl")
    assert_close(m + f["d"] / 40, z.mean(axis=1), TOL_FLOAT64, "mean")


# ------------------------------------------------------------------------------------------
# row_stats: every field against its definition, with temperature and softcap
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("v", [1, 2, 7, 33, 1000])
@pytest.mark.parametrize("offset", [0.0, 3e4, -3e4])
def test_row_stats_fields_match_their_definitions(rng, spec_name, v, offset):
    spec = SPECS[spec_name]
    n = 6
    z = random_logits(rng, n, v, scale=4.0, offset=offset)
    w = random_logits(rng, n, v, scale=2.0, offset=-offset)
    if v > 2:
        z[1, rng.choice(v, v // 2, replace=False)] = -np.inf  # masked entries
        w[2, rng.choice(v, v // 2, replace=False)] = -np.inf
    z[3, 0] = z[3].max() + 60.0  # one dominant logit
    y = rng.integers(0, v, n)
    y[4] = -1
    st = BACKEND.row_stats(encoded(z), y, spec, encoded(w))
    zt, wt = transformed(z, spec), transformed(w, spec)
    for field in st:
        assert field.dtype == np.float64 and field.shape == (n,)
    assert np.isfinite(st.m).all() and np.isfinite(st.m_w).all()
    f = fsum_stats(zt, wt, y, st.m, st.m_w)
    ctx = f"{spec_name} V={v} offset={offset}"
    for name in ("s", "t", "d", "s_w", "u"):
        assert_close(getattr(st, name), f[name], TOL_FLOAT64, f"{name} {ctx}")
    assert_close(st.m + np.log(st.s), lse64(zt), TOL_FLOAT64, f"lse {ctx}")
    assert_close(st.m_w + np.log(st.s_w), lse64(wt), TOL_FLOAT64, f"lse_w {ctx}")
    rows = np.arange(n)
    picked = np.where(y >= 0, zt[rows, np.maximum(y, 0)], np.nan)
    np.testing.assert_array_equal(st.target, picked)  # the transformed logit itself
    np.testing.assert_array_equal(st.target_w, np.where(y >= 0, wt[rows, np.maximum(y, 0)], np.nan))
    # the finishers' forms against scipy (rows without -inf for the mean)
    assert_close(_finish.entropy(st), entropy64(zt), TOL_FLOAT64, f"entropy {ctx}")
    assert_close(_finish.kl(st), kl64(zt, wt), TOL_FLOAT64, f"kl {ctx}")
    finite = np.isfinite(zt).all(axis=1)
    assert_close((st.m + st.d / v)[finite], zt[finite].mean(axis=1), TOL_FLOAT64, f"mean {ctx}")


def test_row_stats_computes_only_what_the_spec_asks(rng):
    z = random_logits(rng, 3, 5)
    y = np.array([0, 1, -1])
    st = BACKEND.row_stats(encoded(z), y, StatsSpec())
    assert st.target is None and st.t is None and st.d is None
    assert st.m_w is None and st.s_w is None and st.target_w is None and st.u is None
    st = BACKEND.row_stats(encoded(z), y, StatsSpec(entropy=True))
    assert st.t is not None and st.target is None and st.d is None and st.u is None


@pytest.mark.parametrize("cast", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda c: np.dtype(c).name)
def test_narrow_encodings_are_computed_from_their_exact_values(rng, cast):
    z = random_logits(rng, 5, 64, scale=2.0).astype(cast)
    w = random_logits(rng, 5, 64, scale=2.0).astype(cast)
    x, xw = encoded(z), encoded(w)
    assert x.dtype == {np.float32: np.float32, np.float16: F16}.get(cast, BF16)
    y = rng.integers(0, 64, 5)
    st = BACKEND.row_stats(x, y, FULL, xw)
    want = BACKEND.row_stats(encoded(z.astype(np.float64)), y, FULL, encoded(w.astype(np.float64)))
    for got, exp in zip(st, want):
        np.testing.assert_array_equal(got, exp)


def test_row_stats_blocks_do_not_change_results(rng, monkeypatch):
    z, w = random_logits(rng, 11, 13), random_logits(rng, 11, 13)
    y = rng.integers(-1, 13, 11)
    whole = BACKEND.row_stats(encoded(z), y, FULL, encoded(w))
    monkeypatch.setattr(config, "REFERENCE_BLOCK_ELEMENTS", 3 * 13)  # 3 rows at a time
    parts = BACKEND.row_stats(encoded(z), y, FULL, encoded(w))
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(a, b)


def test_empty_block():
    st = BACKEND.row_stats(encoded(np.zeros((0, 4))), np.zeros(0, np.int64), FULL, encoded(np.zeros((0, 4))))
    for field in st:
        assert field.shape == (0,)


# ------------------------------------------------------------------------------------------
# canonical special values (module docstring of ptx_numba._rowpass)
# ------------------------------------------------------------------------------------------
SPECIAL_ROWS = [
    # row, (m, s)
    ([np.nan, 0.0, 1.0], (np.nan, np.nan)),
    ([np.nan, np.inf, 0.0], (np.nan, np.nan)),  # NaN wins over +inf
    ([np.nan, -np.inf, -np.inf], (np.nan, np.nan)),
    ([np.inf, 0.0, 1.0], (np.inf, 1.0)),
    ([np.inf, -np.inf, 3.0], (np.inf, 1.0)),
    ([np.inf, np.inf, 0.0], (np.inf, 1.0)),
    ([-np.inf, -np.inf, -np.inf], (-np.inf, 0.0)),
]


@pytest.mark.parametrize("row, ms", SPECIAL_ROWS, ids=str)
@pytest.mark.parametrize("cast", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda c: np.dtype(c).name)
def test_canonical_special_values(row, ms, cast):
    z = np.array([row, [0.0, 1.0, 2.0]]).astype(cast)
    finite = np.array([[0.5, -1.0, 2.0], [0.0, 1.0, 2.0]]).astype(cast)
    y = np.array([1, 2])
    spec = StatsSpec(target=True, entropy=True, dsum=True)
    with np.errstate(invalid="ignore"):  # d of [inf, -inf, ...] warns: see the xfail test below
        st = BACKEND.row_stats(encoded(z), y, spec)
    np.testing.assert_array_equal([st.m[0], st.s[0]], ms)
    assert np.isnan(st.t[0]) and np.isnan(st.d[0])
    np.testing.assert_array_equal(st.target[0], z.astype(np.float64)[0, 1])  # z'_y itself
    assert np.isfinite([st.m[1], st.s[1], st.t[1], st.d[1]]).all()  # the special row stays its own
    # the finishers then give scipy's log-sum-exp special values
    np.testing.assert_array_equal(_finish.lse(st)[0], lse64(z.astype(np.float64))[0])
    assert_close(_finish.lse(st), lse64(z.astype(np.float64)), TOL_FLOAT64, "lse")
    # u is NaN when either set's row is special
    for a, b in ((z, finite), (finite, z)):
        with np.errstate(invalid="ignore"):
            pst = BACKEND.row_stats(encoded(a), y, FULL, encoded(b))
        assert np.isnan(pst.u[0]) and np.isfinite(pst.u[1])


def test_target_of_ignored_row_is_nan_and_masked_target_is_minus_inf():
    z = np.array([[-np.inf, 1.0, 2.0], [0.0, 1.0, 2.0], [-np.inf, -np.inf, 0.0]])
    y = np.array([0, -1, 2])
    st = BACKEND.row_stats(encoded(z), y, StatsSpec(target=True))
    assert st.target[0] == -np.inf and np.isnan(st.target[1]) and st.target[2] == 0.0
    ce = _finish.cross_entropy(st, y >= 0, 3)
    assert ce[0] == np.inf and ce[1] == 0.0 and ce[2] == 0.0


def test_special_rows_raise_no_floating_point_warnings():
    z = np.array([[np.nan, 0.0, 1.0], [np.inf, -np.inf, 3.0], [-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BACKEND.row_stats(encoded(z), np.array([0, 1, 2, -1]), StatsSpec(target=True, entropy=True))


def test_dsum_of_a_row_with_plus_and_minus_inf_raises_no_warning():
    z = np.array([[np.inf, -np.inf, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = BACKEND.row_stats(encoded(z), np.array([2]), StatsSpec(target=True, dsum=True))
    assert np.isnan(st.d[0])


# ------------------------------------------------------------------------------------------
# row_grad against torch autograd (float64)
# ------------------------------------------------------------------------------------------
def torch_ce(torch, zt, y, g, eps, lam, cap):
    """sum_i g_i * ce_i with torch's label smoothing, PaLM's z-loss and a softcap."""
    z = cap * torch.tanh(zt / cap) if cap else zt
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none", label_smoothing=eps, ignore_index=-1)
    if lam:
        ce = ce + lam * torch.where(y >= 0, torch.logsumexp(z, dim=-1) ** 2, 0.0)
    return (ce * g).sum()


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("lam", [0.0, 1e-3])
@pytest.mark.parametrize("cap", [0.0, 5.0])
def test_ce_gradient_matches_torch(rng, eps, lam, cap):
    torch = pytest.importorskip("torch")
    n, v = 7, 19
    z = random_logits(rng, n, v, scale=3.0, offset=float(rng.choice([0.0, 50.0])))
    y = rng.integers(0, v, n)
    y[[1, 5]] = -1
    g = np.where(y >= 0, rng.uniform(0.5, 2.0, n), 0.0)  # a non-uniform upstream gradient
    spec = StatsSpec(softcap=cap, target=True, dsum=eps > 0)
    st = BACKEND.row_stats(encoded(z), y, spec)
    coef = _finish.ce_coef(st, g, v, eps, lam)
    out = np.full(z.shape, np.nan)
    BACKEND.row_grad(encoded(z), y, spec, st, coef, out)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    torch_ce(torch, zt, torch.tensor(y), torch.tensor(g), eps, lam, cap).backward()
    assert_close(out, zt.grad.numpy(), TOL_FLOAT64, f"eps={eps} z_loss={lam} softcap={cap}")
    assert (out[[1, 5]] == 0.0).all()  # ignored rows: an all-zero gradient row
    # and the loss the finisher forms is torch's too
    rows = _finish.cross_entropy(st, y >= 0, v, eps, lam)
    with torch.no_grad():
        want = torch_ce(torch, torch.tensor(z), torch.tensor(y), torch.tensor(g), eps, lam, cap).item()
    assert abs(float(np.sum(rows * g)) - want) <= TOL_FLOAT64 * max(1.0, abs(want))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("which", ["logp", "entropy", "kl", "all"])
def test_logprob_entropy_kl_gradients_match_torch(rng, temperature, which):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    n, v = 6, 23
    z = random_logits(rng, n, v, scale=2.0, offset=float(rng.choice([0.0, -40.0])))
    w = random_logits(rng, n, v, scale=2.0)
    y = rng.integers(0, v, n)
    y[2] = -1
    valid = y >= 0
    gs = {k: np.where(valid, rng.uniform(-2.0, 2.0, n), 0.0) for k in ("logp", "entropy", "kl")}
    use = {k: (which in (k, "all")) for k in gs}
    spec = StatsSpec(inv_temperature=1.0 / temperature, target=True, entropy=use["entropy"], pair=use["kl"])
    st = BACKEND.row_stats(encoded(z), y, spec, encoded(w) if use["kl"] else None)
    coef = _finish.logprob_coef(st, gs["logp"] if use["logp"] else None,
                                gs["entropy"] if use["entropy"] else None, gs["kl"] if use["kl"] else None)
    out = np.full(z.shape, np.nan)
    BACKEND.row_grad(encoded(z), y, spec, st, coef, out, encoded(w) if use["kl"] else None)

    zt = torch.tensor(z, requires_grad=True)
    logp = F.log_softmax(zt / temperature, dim=-1)
    logq = F.log_softmax(torch.tensor(w) / temperature, dim=-1)
    total = 0.0
    if use["logp"]:
        picked = logp.gather(1, torch.tensor(np.maximum(y, 0))[:, None])[:, 0]
        total = total + (torch.tensor(gs["logp"]) * picked).sum()
    if use["entropy"]:
        total = total + (torch.tensor(gs["entropy"]) * -(logp.exp() * logp).sum(-1)).sum()
    if use["kl"]:
        total = total + (torch.tensor(gs["kl"]) * (logp.exp() * (logp - logq)).sum(-1)).sum()
    total.backward()
    assert_close(out, zt.grad.numpy(), TOL_FLOAT64, f"{which} T={temperature}")
    assert (out[2] == 0.0).all()


def test_grad_of_masked_entries_is_zero_and_finite(rng):
    z = random_logits(rng, 3, 9)
    z[:, [0, 4]] = -np.inf
    y = np.array([1, 2, 3])
    spec = StatsSpec(target=True, entropy=True)
    st = BACKEND.row_stats(encoded(z), y, spec)
    out = np.empty(z.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BACKEND.row_grad(encoded(z), y, spec, st, _finish.logprob_coef(st, np.ones(3), np.ones(3)), out)
    assert np.isfinite(out).all() and (out[:, [0, 4]] == 0.0).all()


@pytest.mark.parametrize("out_dtype, spike", [(np.float32, 30.0), (BF16, 30.0), (F16, 12.0)],
                         ids=["float32", "bfloat16", "float16"])
def test_gradient_is_rounded_once_from_float64(rng, out_dtype, spike):
    """A narrow gradient is the float64 gradient rounded once, so p_y - 1 survives where p_y
    itself rounds to 1 in the output dtype (Liger-Kernel #1329)."""
    z = random_logits(rng, 5, 12, scale=1.0)
    z[0, 3] = spike
    y = np.array([3, 1, 2, -1, 0])
    g = np.where(y >= 0, 1.0, 0.0)
    spec = StatsSpec(target=True)
    st = BACKEND.row_stats(encoded(z), y, spec)
    coef = _finish.ce_coef(st, g, 12)
    exact = np.empty(z.shape)
    BACKEND.row_grad(encoded(z), y, spec, st, coef, exact)
    p_y = 1.0 + exact[0, 3]
    assert decode_to_float64(encode_from_float64(np.array([p_y]), out_dtype))[0] == 1.0  # the hard case
    out = np.empty(z.shape, out_dtype)
    BACKEND.row_grad(encoded(z), y, spec, st, coef, out)
    np.testing.assert_array_equal(out, encode_from_float64(exact, out_dtype))
    assert decode_to_float64(out[:1])[0, 3] < 0.0  # p_y - 1 kept, not rounded to 0


def test_row_grad_in_place_over_its_input(rng):
    """``out`` may alias ``x``: every element is read before it is written."""
    z = random_logits(rng, 4, 10)
    y = np.array([1, -1, 9, 0])
    spec = StatsSpec(target=True, dsum=True)
    st = BACKEND.row_stats(encoded(z), y, spec)
    coef = _finish.ce_coef(st, np.where(y >= 0, 0.25, 0.0), 10, 0.1)
    want = np.empty(z.shape)
    BACKEND.row_grad(encoded(z), y, spec, st, coef, want)
    buf = z.copy()
    BACKEND.row_grad(buf, y, spec, st, coef, buf)
    np.testing.assert_array_equal(buf, want)


def test_all_zero_coefficients_give_zero_rows_even_for_special_rows():
    z = np.array([[np.nan, 0.0], [np.inf, 1.0], [0.0, 1.0]])
    y = np.array([-1, -1, 0])
    spec = StatsSpec(target=True)
    st = BACKEND.row_stats(encoded(z), y, spec)
    coef = _finish.ce_coef(st, np.array([0.0, 0.0, 1.0]), 2)
    out = np.full(z.shape, 7.0)
    with np.errstate(all="ignore"):
        BACKEND.row_grad(encoded(z), y, spec, st, coef, out)
    assert (out[:2] == 0.0).all() and np.isfinite(out[2]).all()
    assert abs(out[2].sum()) <= TOL_FLOAT64  # p sums to 1 minus the label's 1


def test_reference_does_not_modify_its_inputs(rng):
    z, w = random_logits(rng, 4, 10), random_logits(rng, 4, 10)
    z[0, 0] = -np.inf
    x, xw = encoded(z), encoded(w)
    before, before_w = x.copy(), xw.copy()
    y = np.array([1, -1, 3, 0])
    y_before = y.copy()
    st = BACKEND.row_stats(x, y, FULL, xw)
    st_before = [f.copy() for f in st]
    coef = _finish.logprob_coef(st, np.ones(4), np.ones(4), np.ones(4))
    BACKEND.row_grad(x, y, FULL, st, coef, np.empty(z.shape), xw)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(xw, before_w)
    np.testing.assert_array_equal(y, y_before)
    for a, b in zip(st, st_before):
        np.testing.assert_array_equal(a, b)
    assert isinstance(coef, GradCoef)
