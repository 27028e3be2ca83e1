"""The options and newer public functions on every host backend, against float64 PyTorch/SciPy:
``cross_entropy(label_smoothing, z_loss, softcap)``, ``cross_entropy_and_grad``,
``ptx_loss_and_grad``, ``token_logprobs(return_entropy)``, ``entropy``, ``kl_divergence`` and
``kl_penalty`` (every estimator); then their bad input (clear errors, nothing written).

Ground truth is computed in float64 from the exact values the caller's (possibly narrow) array
holds; tolerances are the contract's (:mod:`ptx_numba.contract`).
"""
import re

import ml_dtypes
import numpy as np
import pytest

import ptx_numba as pn
from exact import as_f64, assert_close, cast, entropy64, kl64, logp64
from ptx_numba import _dispatch
from ptx_numba.contract import TOL_FLOAT32, tolerance

HOST_BACKENDS = [b for b in pn.available_backends() if b != "cuda"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
ESTIMATORS = ["k1", "abs", "k2", "k3", "full"]


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    yield
    _dispatch._reset_for_tests()


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def check_grad(got, want, dtype, what):
    """A gradient in ``dtype``: the float64 value within the contract plus one rounding to it."""
    got, want = as_f64(got), as_f64(want)
    assert got.shape == want.shape, what
    tol = tolerance(dtype)
    eps = float(ml_dtypes.finfo(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)).eps)
    bound = tol * np.maximum(1.0, np.abs(want)) + (eps * np.abs(want) if dtype in ("float16", "bfloat16") else 0.0)
    bad = ~(np.abs(got - want) <= bound)
    assert not bad.any(), f"{what}: worst {np.abs(got - want)[bad].max():.3g} at {np.argwhere(bad)[0]}"


def batch(rng, dtype, n=9, v=37, *, offsets=True, mask=True):
    """Logits in ``dtype`` with ±3e4 offsets, a dominant logit and -inf masks; labels with
    ignored rows. Returns (logits, labels, float64 values)."""
    z = rng.normal(0.0, 3.0, size=(n, v))
    if offsets:
        z[1] += 3e4
        z[2] -= 3e4
    z[3, 5] += 60.0
    y = rng.integers(0, v, n)
    if mask:
        m = rng.random(v) < 0.4
        m[y[4]] = False
        z[4, m] = -np.inf
    y[[0, 6]] = -100
    x = cast(np.clip(z, -6e4, 6e4), dtype)
    return x, y, as_f64(x)


# ------------------------------------------------------------------------------------------
# float64 ground truth
# ------------------------------------------------------------------------------------------
def torch_ce_rows(torch, z, y, eps=0.0, lam=0.0, cap=None, temperature=None):
    """Per-row CE with torch's label smoothing, PaLM's z-loss and a softcap (ignored rows 0)."""
    zt = z if isinstance(z, torch.Tensor) else torch.tensor(z, dtype=torch.float64)
    if cap is not None:
        zt = cap * torch.tanh(zt / cap)
    yt = torch.as_tensor(y)
    rows = torch.nn.functional.cross_entropy(zt, yt, reduction="none", label_smoothing=eps, ignore_index=-100)
    if lam:
        rows = rows + lam * torch.where(yt != -100, torch.logsumexp(zt, dim=-1) ** 2, 0.0)
    return rows


def gather(a, y):
    return np.take_along_axis(a, np.maximum(y, 0)[..., None], axis=-1)[..., 0]


# ------------------------------------------------------------------------------------------
# cross entropy options
# ------------------------------------------------------------------------------------------
OPTIONS = [
    dict(label_smoothing=0.1),
    dict(label_smoothing=1.0),
    dict(z_loss=1e-4),
    dict(softcap=30.0),
    dict(softcap=3.0, z_loss=1e-3, label_smoothing=0.2),
]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cross_entropy_options_match_torch(rng, torch, backend, dtype, opts):
    x, y, z = batch(rng, dtype, mask="label_smoothing" not in opts)  # smoothing of a -inf row is inf
    eps, lam, cap = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0), opts.get("softcap")
    want = torch_ce_rows(torch, z, y, eps, lam, cap).numpy()
    valid = y != -100
    ctx = f"{backend}/{dtype}/{opts}"
    tol = tolerance(dtype)
    rows = pn.cross_entropy(x, y, reduction="none", backend=backend, **opts)
    assert rows.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close(rows, want, tol, "none " + ctx)
    assert (rows[~valid] == 0.0).all()
    bound = tol * np.maximum(1.0, np.abs(want[valid])).sum()
    assert abs(pn.cross_entropy(x, y, reduction="sum", backend=backend, **opts) - want.sum()) <= bound
    mean = pn.cross_entropy(x, y, backend=backend, **opts)
    assert abs(mean - want.sum() / valid.sum()) <= bound / valid.sum()
    r = pn.ptx_loss(0.25, x, y, 0.5, backend=backend, **opts)
    assert r.ce == mean and r.ptx == 0.5 * mean and r.total == 0.25 + r.ptx


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_default_options_are_the_plain_cross_entropy(rng, backend):
    x, y, _ = batch(rng, "float32")
    plain = pn.cross_entropy(x, y, reduction="none", backend=backend)
    same = pn.cross_entropy(x, y, reduction="none", label_smoothing=0.0, z_loss=0.0, softcap=None, backend=backend)
    np.testing.assert_array_equal(plain, same)


# ------------------------------------------------------------------------------------------
# cross_entropy_and_grad, ptx_loss_and_grad
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, z_loss=1e-4, softcap=20.0)],
                         ids=["plain", "options"])
def test_cross_entropy_and_grad_match_torch_autograd(rng, torch, backend, dtype, reduction, opts):
    x, y, z = batch(rng, dtype, offsets=False, mask=False)
    x, y, z = x.reshape(3, 3, -1), y.reshape(3, 3), z.reshape(3, 3, -1)  # [B, T, V]
    go = rng.uniform(-2.0, 2.0, y.shape) if reduction == "none" else 1.7
    eps, lam, cap = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0), opts.get("softcap")
    zt = torch.tensor(z.reshape(9, -1), requires_grad=True)
    rows = torch_ce_rows(torch, zt, y.reshape(-1), eps, lam, cap)
    valid = y.reshape(-1) != -100
    if reduction == "none":
        total = (rows * torch.tensor(go.reshape(-1))).sum()
    else:
        total = go * (rows.sum() if reduction == "sum" else rows.sum() / valid.sum())
    total.backward()
    want_grad = zt.grad.numpy().reshape(z.shape)

    loss, grad = pn.cross_entropy_and_grad(x, y, reduction=reduction, grad_output=go, backend=backend, **opts)
    forward = pn.cross_entropy(x, y, reduction=reduction, backend=backend, **opts)
    if reduction == "none":
        np.testing.assert_array_equal(loss, forward)
    else:
        assert loss == forward
    assert grad.shape == x.shape and grad.dtype == x.dtype
    check_grad(grad, want_grad, dtype, f"{backend}/{dtype}/{reduction}/{opts}")
    assert (as_f64(grad).reshape(9, -1)[~valid] == 0.0).all()  # ignored rows: zero gradient


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_grad_of_all_ignored_batch_is_zero(rng, backend):
    x = rng.normal(size=(4, 6)).astype(np.float32)
    loss, grad = pn.cross_entropy_and_grad(x, np.full(4, -100), backend=backend)
    assert loss == 0.0 and (grad == 0.0).all() and grad.dtype == np.float32
    r, grad = pn.ptx_loss_and_grad(0.5, x, np.full(4, -100), 0.3, backend=backend)
    assert tuple(r) == (0.5, 0.0, 0.0) and (grad == 0.0).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_in_place_backward_out_is_logits(rng, backend, dtype):
    x, y, _ = batch(rng, dtype, offsets=False, mask=False)
    x = np.ascontiguousarray(x)
    want_loss, want_grad = pn.cross_entropy_and_grad(x, y, label_smoothing=0.1, backend=backend)
    loss, grad = pn.cross_entropy_and_grad(x, y, label_smoothing=0.1, out=x, backend=backend)
    assert grad is x
    assert loss == want_loss
    np.testing.assert_array_equal(as_f64(x), as_f64(want_grad))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_separate_array_is_filled_and_returned(rng, backend):
    x, y, _ = batch(rng, "float32")
    want = pn.cross_entropy_and_grad(x, y, backend=backend)[1]
    out = np.full(x.shape, np.nan, np.float32)
    got = pn.cross_entropy_and_grad(x, y, out=out, backend=backend)[1]
    assert got is out
    np.testing.assert_array_equal(out, want)
    # a strided out (non-unit stride along V) is written through too
    wide = np.full((x.shape[0], 2 * x.shape[1]), np.nan, np.float32)
    got = pn.cross_entropy_and_grad(x, y, out=wide[:, ::2], backend=backend)[1]
    np.testing.assert_array_equal(wide[:, ::2], want)
    assert np.isnan(wide[:, 1::2]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_ptx_loss_and_grad_is_beta_times_mean_ce_gradient(rng, backend):
    x, y, _ = batch(rng, "float64", mask=False)
    opts = dict(label_smoothing=0.05, z_loss=1e-5, softcap=50.0)
    r, grad = pn.ptx_loss_and_grad(0.75, x, y, 0.2, backend=backend, **opts)
    assert tuple(r) == tuple(pn.ptx_loss(0.75, x, y, 0.2, backend=backend, **opts))
    _, g = pn.cross_entropy_and_grad(x, y, grad_output=0.2, backend=backend, **opts)
    np.testing.assert_array_equal(grad, g)
    _, g1 = pn.cross_entropy_and_grad(x, y, backend=backend, **opts)
    assert_close(grad, 0.2 * g1, tolerance("float64"), "beta scaling")


# ------------------------------------------------------------------------------------------
# the log-prob family
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_scipy(rng, backend, dtype, temperature):
    x, y, z = batch(rng, dtype)
    y[7] = int(np.flatnonzero(z[4] == -np.inf)[0]) if np.isinf(z[4]).any() else y[7]
    x, y, z = x.reshape(3, 3, -1), y.reshape(3, 3), z.reshape(3, 3, -1)
    valid = y != -100
    want_lp = np.where(valid, gather(logp64(z, temperature), y), 0.0)
    want_h = np.where(valid, entropy64(z, temperature), 0.0)
    tol = tolerance(dtype)
    lp = pn.token_logprobs(x, y, temperature=temperature, backend=backend)
    assert lp.shape == y.shape and lp.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close(lp, want_lp, tol, f"logp {backend}/{dtype}/T={temperature}")
    lp2, h = pn.token_logprobs(x, y, temperature=temperature, return_entropy=True, backend=backend)
    assert_close(lp2, want_lp, tol, f"logp with entropy {backend}/{dtype}")  # another pass: same contract
    assert_close(h, want_h, tol, f"entropy {backend}/{dtype}")
    assert (lp[~valid] == 0.0).all() and (h[~valid] == 0.0).all()
    if temperature == 1.0:  # log p(y) = -CE
        np.testing.assert_array_equal(lp, -pn.cross_entropy(x, y, reduction="none", backend=backend))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_token_at_minus_inf_logit_gives_minus_inf(backend):
    z = np.array([[-np.inf, 0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    lp = pn.token_logprobs(z, [0, 1], backend=backend)
    assert lp[0] == -np.inf and lp[1] == pytest.approx(-np.log(3), rel=TOL_FLOAT32)
    k1 = pn.kl_penalty(z, np.zeros((2, 3), np.float32), [0, 1], backend=backend)
    assert k1[0] == -np.inf  # log p - log q = -inf - log(1/3)
    k1 = pn.kl_penalty(np.zeros((2, 3), np.float32), z, [0, 1], backend=backend)
    assert k1[0] == np.inf and not np.isnan(k1).any()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 1.9])
def test_entropy_matches_scipy(rng, backend, dtype, temperature):
    x, _, z = batch(rng, dtype)
    got = pn.entropy(x, temperature=temperature, backend=backend)
    assert got.shape == (x.shape[0],)
    assert_close(got, entropy64(z, temperature), tolerance(dtype), f"{backend}/{dtype}/T={temperature}")
    assert (got >= -tolerance(dtype)).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype, ref_dtype", [("float32", "float32"), ("float64", "float64"),
                                              ("bfloat16", "float32"), ("float16", "bfloat16")])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_kl_divergence_matches_scipy(rng, backend, dtype, ref_dtype, temperature):
    x, _, z = batch(rng, dtype, mask=False)
    w = z + rng.normal(0.0, 1.0, z.shape)  # a nearby reference policy
    wx = cast(w, ref_dtype)
    got = pn.kl_divergence(x, wx, temperature=temperature, backend=backend)
    want = kl64(z, as_f64(wx), temperature)
    tol = tolerance("float64" if dtype == ref_dtype == "float64" else "float32")
    assert_close(got, want, tol, f"{backend}/{dtype}/{ref_dtype}/T={temperature}")
    assert (got >= -tol).all()
    assert_close(pn.kl_divergence(x, x, backend=backend), np.zeros(x.shape[0]), tol, "KL(p||p)")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_kl_divergence_masks(backend):
    z = np.array([[0.0, 1.0, -np.inf], [0.0, 1.0, 2.0], [0.0, -np.inf, 1.0]])
    w = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, -np.inf], [0.0, -np.inf, 1.0]])
    got = pn.kl_divergence(z, w, backend=backend)
    want = kl64(z, w)
    assert got[1] == np.inf  # the reference gives 0 to a token the policy does not
    assert_close(got, want, tolerance("float64"), "masks")


def estimate(lp, lq, estimator):
    r = lp - lq
    return {"k1": r, "abs": np.abs(r), "k2": 0.5 * r * r, "k3": np.exp(-r) - 1.0 + r}[estimator]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_kl_penalty_estimators(rng, backend, estimator, dtype):
    x, y, z = batch(rng, dtype, mask=False)
    w = cast(z + rng.normal(0.0, 0.5, z.shape), "float32")
    x, y, z, w = x.reshape(3, 3, -1), y.reshape(3, 3), z.reshape(3, 3, -1), w.reshape(3, 3, -1)
    valid = y != -100
    temperature = 0.8
    if estimator == "full":
        want = kl64(z, as_f64(w), temperature)
    else:
        want = estimate(gather(logp64(z, temperature), y), gather(logp64(as_f64(w), temperature), y), estimator)
    want = np.where(valid, want, 0.0)
    got = pn.kl_penalty(x, w, y, estimator=estimator, temperature=temperature, backend=backend)
    assert got.shape == y.shape
    # w is float32: with two logit sets the float64 bound needs both in float64 (contract.py)
    assert_close(got, want, tolerance("float32"), f"{backend}/{estimator}/{dtype}")
    assert (got[~valid] == 0.0).all()
    if estimator == "full":
        kl = pn.kl_divergence(x, w, temperature=temperature, backend=backend)
        np.testing.assert_array_equal(got[valid], kl[valid])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_kl_penalty_of_identical_policies_is_zero(rng, backend):
    x = rng.normal(size=(5, 11)) + 3e4
    y = rng.integers(0, 11, 5)
    for estimator in ESTIMATORS:
        got = pn.kl_penalty(x, x.copy(), y, estimator=estimator, backend=backend)
        assert_close(got, np.zeros(5), tolerance("float64"), estimator)


# ------------------------------------------------------------------------------------------
# the caller's arrays are never written by default
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_new_functions_never_modify_their_inputs(rng, backend, dtype):
    x, y, _ = batch(rng, dtype)
    x = np.asfortranarray(x) if dtype == "float64" else x
    w = cast(as_f64(x) * 0.5, "float32")
    copies = [a.copy(order="A") for a in (x, y, w)]
    pn.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4, softcap=10.0, backend=backend)
    pn.cross_entropy_and_grad(x, y, label_smoothing=0.1, backend=backend)
    pn.cross_entropy_and_grad(x, y, reduction="none", grad_output=np.ones(y.shape), backend=backend)
    pn.ptx_loss_and_grad(0.1, x, y, 0.5, backend=backend)
    pn.token_logprobs(x, y, return_entropy=True, temperature=0.9, backend=backend)
    pn.entropy(x, backend=backend)
    pn.kl_divergence(x, w, backend=backend)
    for estimator in ESTIMATORS:
        pn.kl_penalty(x, w, y, estimator=estimator, backend=backend)
    for a, c in zip((x, y, w), copies):
        assert a.tobytes(order="A") == c.tobytes(order="A")


# ------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ------------------------------------------------------------------------------------------
Z = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
W = np.array([[0.0, 2.0, 1.0], [1.5, -1.0, 0.0]])
TOK = [0, 2]


@pytest.mark.parametrize("call", [
    lambda: pn.kl_divergence(Z, np.zeros((2, 4))),
    lambda: pn.kl_divergence(Z, np.zeros((1, 2, 3))),
    lambda: pn.kl_penalty(Z, np.zeros((3, 3)), TOK),
])
def test_ref_logits_shape_mismatch(call):
    with pytest.raises(ValueError, match=r"ref_logits shape \(.*\) does not match logits shape \(2, 3\)"):
        call()


@pytest.mark.parametrize("tokens", [[0], [0, 1, 2], [[0, 1]], 0])
@pytest.mark.parametrize("fn", ["token_logprobs", "kl_penalty"])
def test_tokens_shape_mismatch(fn, tokens):
    call = (lambda: pn.token_logprobs(Z, tokens)) if fn == "token_logprobs" else (lambda: pn.kl_penalty(Z, W, tokens))
    shape = re.escape(str(np.shape(tokens)))
    with pytest.raises(ValueError, match=rf"tokens shape {shape} does not match logits shape \(2, 3\)"):
        call()


def test_tokens_out_of_range_and_missing():
    with pytest.raises(ValueError, match=r"tokens\[1\] = 3 is out of range for vocabulary size V = 3"):
        pn.token_logprobs(Z, [0, 3])
    with pytest.raises(ValueError, match=r"tokens\[0\] = -1 is out of range"):
        pn.kl_penalty(Z, W, [-1, 0])
    with pytest.raises(TypeError, match="tokens is None"):
        pn.token_logprobs(Z, None)
    with pytest.raises(TypeError, match="ref_logits is None"):
        pn.kl_divergence(Z, None)
    with pytest.raises(TypeError, match="ref_logits and tokens are required"):
        pn.kl_penalty(Z, None, TOK)


@pytest.mark.parametrize("estimator", ["k4", "K1", "", None, "kl"])
def test_unknown_estimator_lists_valid_ones(estimator):
    with pytest.raises(ValueError, match=r"unknown estimator .*valid estimators are \('k1', 'abs', 'k2', 'k3', 'full'\)"):
        pn.kl_penalty(Z, W, TOK, estimator=estimator)


TEMPERATURE_CALLS = {
    "token_logprobs": lambda t: pn.token_logprobs(Z, TOK, temperature=t),
    "entropy": lambda t: pn.entropy(Z, temperature=t),
    "kl_divergence": lambda t: pn.kl_divergence(Z, W, temperature=t),
    "kl_penalty": lambda t: pn.kl_penalty(Z, W, TOK, temperature=t),
}


@pytest.mark.parametrize("fn", list(TEMPERATURE_CALLS))
@pytest.mark.parametrize("value, exc, match", [
    (0.0, ValueError, r"temperature must be > 0, got 0\.0"),
    (-1.0, ValueError, r"temperature must be > 0, got -1\.0"),
    (np.nan, ValueError, "temperature must be finite, got nan"),
    (np.inf, ValueError, "temperature must be finite, got inf"),
    (-np.inf, ValueError, "temperature must be finite"),
    (1e-320, ValueError, "temperature .* is too small"),
    (10**400, ValueError, "temperature must be finite"),
    ("1.0", TypeError, "temperature must be a real number"),
    (None, TypeError, "temperature must be a real number"),
], ids=repr)
def test_bad_temperature(fn, value, exc, match):
    with pytest.raises(exc, match=match):
        TEMPERATURE_CALLS[fn](value)


CE_CALLS = {
    "cross_entropy": lambda **kw: pn.cross_entropy(Z, TOK, **kw),
    "cross_entropy_and_grad": lambda **kw: pn.cross_entropy_and_grad(Z, TOK, **kw),
    "ptx_loss": lambda **kw: pn.ptx_loss(0.0, Z, TOK, 0.1, **kw),
    "ptx_loss_and_grad": lambda **kw: pn.ptx_loss_and_grad(0.0, Z, TOK, 0.1, **kw),
}


@pytest.mark.parametrize("fn", list(CE_CALLS))
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\], got -0\.1"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1\.5"),
    (dict(label_smoothing=np.nan), ValueError, "label_smoothing must be finite"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a real number"),
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be >= 0, got -0\.0001"),
    (dict(z_loss=np.inf), ValueError, "z_loss must be finite"),
    (dict(z_loss=None), TypeError, "z_loss must be a real number"),
    (dict(softcap=0.0), ValueError, r"softcap must be > 0 \(or None for no softcap\), got 0\.0"),
    (dict(softcap=-5.0), ValueError, "softcap must be > 0"),
    (dict(softcap=np.inf), ValueError, "softcap must be finite"),
    (dict(softcap=np.nan), ValueError, "softcap must be finite"),
    (dict(softcap="big"), TypeError, "softcap must be a real number"),
], ids=repr)
def test_bad_ce_options(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CE_CALLS[fn](**kwargs)


def _out_cases():
    buf = np.zeros(2 * 3 + 2)
    overlapping_labels = buf.view(np.int64)[:2]  # zeros: valid labels sharing out's memory
    ro = np.zeros((2, 3))
    ro.flags.writeable = False
    return {
        "wrong_shape": (np.zeros((2, 4)), TOK, ValueError, r"out shape \(2, 4\) does not match logits shape \(2, 3\)"),
        "wrong_shape_flat": (np.zeros(6), TOK, ValueError, "out shape"),
        "wrong_dtype": (np.zeros((2, 3), np.float32), TOK, ValueError,
                        "out dtype float32 does not match the gradient dtype float64"),
        "read_only": (ro, TOK, ValueError, "out is read-only"),
        "overlaps_labels": (buf[:6].reshape(2, 3), overlapping_labels, ValueError, "out overlaps labels"),
        "not_an_array": ([[0.0] * 3] * 2, TOK, TypeError, "out must be a NumPy array"),
    }


@pytest.mark.parametrize("case", list(_out_cases()))
def test_bad_out(case):
    out, labels, exc, match = _out_cases()[case]
    before = np.array(out, copy=True)
    z = Z.copy()
    with pytest.raises(exc, match=match):
        pn.cross_entropy_and_grad(z, labels, out=out)
    with pytest.raises(exc, match=match):
        pn.ptx_loss_and_grad(0.0, z, labels, 0.1, out=out)
    np.testing.assert_array_equal(np.asarray(out), before)  # nothing written
    np.testing.assert_array_equal(z, Z)


def test_out_partly_overlapping_logits_is_refused():
    buf = np.arange(8.0)
    z, out = buf[:6].reshape(2, 3), buf[2:8].reshape(2, 3)
    before = buf.copy()
    with pytest.raises(ValueError, match="out overlaps logits without being logits itself"):
        pn.cross_entropy_and_grad(z, TOK, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("reduction, grad_output, exc, match", [
    ("none", np.ones(3), ValueError, r"grad_output shape \(3,\) does not match labels shape \(2,\)"),
    ("none", np.ones((2, 1)), ValueError, r"grad_output shape \(2, 1\) does not match labels shape"),
    ("none", 1.0, ValueError, r"grad_output shape \(\) does not match labels shape"),
    ("none", [1.0, np.nan], ValueError, "grad_output must be finite"),
    ("none", [np.inf, 1.0], ValueError, "grad_output must be finite"),
    ("none", ["a", "b"], TypeError, "grad_output must be real numbers"),
    ("mean", np.nan, ValueError, "grad_output must be finite, got nan"),
    ("sum", -np.inf, ValueError, "grad_output must be finite, got -inf"),
    ("mean", np.ones(2), TypeError, "grad_output must be a real number"),
    ("sum", None, TypeError, "grad_output must be a real number"),
], ids=repr)
def test_bad_grad_output(reduction, grad_output, exc, match):
    out = np.full((2, 3), 5.0)
    with pytest.raises(exc, match=match):
        pn.cross_entropy_and_grad(Z, TOK, reduction=reduction, grad_output=grad_output, out=out)
    assert (out == 5.0).all()
