"""ptx_numba.torch: token log-probs, entropy, KL and kl_penalty against torch expressions."""
import pytest

torch = pytest.importorskip("torch")
pnt = pytest.importorskip("ptx_numba.torch")

from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64  # noqa: E402

IGN = -100
ESTIMATORS = ["k1", "abs", "k2", "k3", "full"]


def _tensor(rng, shape, dtype=torch.float64, scale=2.0, requires_grad=True):
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype).requires_grad_(requires_grad)


def _tokens(rng, shape, vocab, ignored=0.25):
    y = rng.integers(0, vocab, size=shape)
    y[rng.random(shape) < ignored] = IGN
    y.reshape(-1)[0] = 0  # at least one valid position
    return torch.from_numpy(y)


def _logp_all(z, temperature=1.0):
    return torch.log_softmax(z / temperature, dim=-1)


def _torch_logp(z, tokens, temperature=1.0):
    valid = tokens != IGN
    picked = _logp_all(z, temperature).gather(-1, torch.where(valid, tokens, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def _torch_entropy(z, temperature=1.0):
    lp = _logp_all(z, temperature)
    return -(lp.exp() * lp).sum(-1)


def _torch_kl(z, w, temperature=1.0):
    lp, lq = _logp_all(z, temperature), _logp_all(w, temperature)
    return (lp.exp() * (lp - lq)).sum(-1)


def _torch_penalty(z, w, tokens, estimator, temperature=1.0):
    valid = tokens != IGN
    if estimator == "full":
        pen = _torch_kl(z, w, temperature)
    else:
        r = _torch_logp(z, tokens, temperature) - _torch_logp(w, tokens, temperature)
        pen = {"k1": r, "abs": r.abs(), "k2": 0.5 * r * r, "k3": torch.exp(-r) - 1 + r}[estimator]
    return torch.where(valid, pen, torch.zeros_like(pen))


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


# ------------------------------------------------------------------------------------------------
# gradcheck (float64)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_logprobs_entropy(rng, shape, temperature):
    x = _tensor(rng, shape)
    tok = _tokens(rng, shape[:-1], shape[-1])
    assert torch.autograd.gradcheck(lambda z: pnt.token_logprobs(z, tok, temperature=temperature), (x,))
    assert torch.autograd.gradcheck(
        lambda z: pnt.token_logprobs(z, tok, temperature=temperature, return_entropy=True), (x,))
    assert torch.autograd.gradcheck(lambda z: pnt.entropy(z, temperature=temperature), (x,))
    ref = _tensor(rng, shape, requires_grad=False)
    assert torch.autograd.gradcheck(lambda z: pnt.kl_divergence(z, ref, temperature=temperature), (x,))


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_kl_penalty(rng, shape, estimator):
    x = _tensor(rng, shape)
    ref = _tensor(rng, shape, requires_grad=False)
    tok = _tokens(rng, shape[:-1], shape[-1])
    assert torch.autograd.gradcheck(
        lambda z: pnt.kl_penalty(z, ref, tok, estimator=estimator, temperature=1.3), (x,))


# ------------------------------------------------------------------------------------------------
# values and gradients against torch expressions
# ------------------------------------------------------------------------------------------------
def _close(ours, exact, tol):
    err = (ours.detach().double() - exact.detach()).abs()
    assert (err <= tol * torch.clamp(exact.detach().abs(), min=1.0)).all(), float(err.max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy_match_torch(rng, dtype):
    x = _tensor(rng, (2, 7, 23), dtype=dtype, scale=3.0)
    tok = _tokens(rng, (2, 7), 23)
    w_logp = torch.from_numpy(rng.standard_normal((2, 7)))
    w_ent = torch.from_numpy(rng.standard_normal((2, 7)))
    logp, ent = pnt.token_logprobs(x, tok, temperature=0.8, return_entropy=True)
    assert logp.shape == ent.shape == tok.shape
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (logp[tok == IGN] == 0).all() and (ent[tok == IGN] == 0).all()
    exact_x = x.detach().double()
    tol = TOL_FLOAT64 if dtype == torch.float64 else TOL_FLOAT32
    _close(logp, _torch_logp(exact_x, tok, 0.8), tol)
    valid = tok != IGN
    _close(ent[valid], _torch_entropy(exact_x, 0.8)[valid], tol)
    ((logp.double() * w_logp).sum() + (ent.double() * w_ent).sum()).backward()

    def objective(z):
        e = torch.where(valid, _torch_entropy(z, 0.8), torch.zeros(()))
        return (_torch_logp(z, tok, 0.8) * w_logp).sum() + (e * w_ent).sum()

    exact = _grad(objective, exact_x)
    assert x.grad.dtype == dtype
    # bfloat16 gradients: one bfloat16 rounding (2**-8) relative to the row scale, not the contract
    bound = TOL_FLOAT64 if dtype == torch.float64 else TOL_FLOAT32 if dtype == torch.float32 else 2.0**-8
    scale = torch.clamp(exact.abs().amax(dim=-1, keepdim=True), min=1.0)
    assert ((x.grad.double() - exact).abs() <= bound * scale).all()


def test_only_entropy_gets_a_gradient(rng):
    """With return_entropy, a loss on the entropy alone differentiates through it (logp's grad is None)."""
    x = _tensor(rng, (5, 9))
    tok = _tokens(rng, (5,), 9, ignored=0.0)
    _, ent = pnt.token_logprobs(x, tok, return_entropy=True)
    ent.sum().backward()
    assert torch.allclose(x.grad, _grad(lambda z: _torch_entropy(z).sum(), x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_entropy_and_kl_divergence_match_torch(rng, temperature):
    x = _tensor(rng, (4, 3, 17), dtype=torch.float32)
    ref = _tensor(rng, (4, 3, 17), dtype=torch.float32)
    x.data[0, 0] += 3e4  # shift-invariance at a large offset
    up = torch.from_numpy(rng.standard_normal((4, 3)))
    ent = pnt.entropy(x, temperature=temperature)
    kl = pnt.kl_divergence(x, ref, temperature=temperature)
    assert ent.shape == kl.shape == (4, 3)
    _close(ent, _torch_entropy(x.detach().double(), temperature), TOL_FLOAT32)
    _close(kl, _torch_kl(x.detach().double(), ref.detach().double(), temperature), TOL_FLOAT32)
    ((ent.double() + 2 * kl.double()) * up).sum().backward()
    assert ref.grad is None  # the reference is a constant
    exact = _grad(lambda z: ((_torch_entropy(z, temperature) + 2 * _torch_kl(z, ref.detach().double(), temperature))
                             * up).sum(), x.detach().double())
    # absolute: at least as strict as the contract's bound relative to max(1, |exact|)
    assert torch.allclose(x.grad.double(), exact, atol=TOL_FLOAT32, rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_penalty_matches_torch(rng, estimator, dtype):
    x = _tensor(rng, (3, 6, 19), dtype=dtype)
    ref = (x.detach() + _tensor(rng, (3, 6, 19), dtype=dtype, scale=0.5, requires_grad=False)).requires_grad_(True)
    tok = _tokens(rng, (3, 6), 19)
    up = torch.from_numpy(rng.standard_normal((3, 6)))
    pen = pnt.kl_penalty(x, ref, tok, estimator=estimator, temperature=0.9)
    assert pen.shape == tok.shape and (pen[tok == IGN] == 0).all()
    exact_x, exact_ref = x.detach().double(), ref.detach().double()
    tol = TOL_FLOAT64 if dtype == torch.float64 else TOL_FLOAT32
    _close(pen, _torch_penalty(exact_x, exact_ref, tok, estimator, 0.9), tol)
    (pen.double() * up).sum().backward()
    assert ref.grad is None
    exact = _grad(lambda z: (_torch_penalty(z, exact_ref, tok, estimator, 0.9) * up).sum(), exact_x)
    scale = torch.clamp(exact.abs().amax(dim=-1, keepdim=True), min=1.0)
    assert ((x.grad.double() - exact).abs() <= tol * scale).all()


def test_equal_policies_give_zero_penalty_and_gradient(rng):
    x = _tensor(rng, (4, 11))
    tok = _tokens(rng, (4,), 11)
    for estimator in ESTIMATORS:
        z = x.detach().clone().requires_grad_(True)
        pen = pnt.kl_penalty(z, x.detach(), tok, estimator=estimator)
        assert (pen.abs() <= 1e-12).all()
        pen.sum().backward()
        if estimator != "k1":  # d/dz of r at r = 0 is 0 for |r| (sign 0), r**2/2, k3 and the full KL
            assert (z.grad.abs() <= 1e-12).all()


def test_all_ignored_and_bad_input(rng):
    x = _tensor(rng, (3, 5), dtype=torch.float32)
    ref = _tensor(rng, (3, 5), dtype=torch.float32, requires_grad=False)
    none = torch.full((3,), IGN)
    logp, ent = pnt.token_logprobs(x, none, return_entropy=True)
    pen = pnt.kl_penalty(x, ref, none, estimator="k3")
    assert (logp == 0).all() and (ent == 0).all() and (pen == 0).all()
    (logp.sum() + ent.sum() + pen.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="estimator"):
        pnt.kl_penalty(x, ref, torch.zeros(3, dtype=torch.int64), estimator="k4")
    with pytest.raises(ValueError, match="shape"):
        pnt.kl_divergence(x, ref[:2])
    with pytest.raises(ValueError, match="temperature"):
        pnt.entropy(x, temperature=0.0)
    with pytest.raises(TypeError, match="ref_logits"):
        pnt.kl_penalty(x, ref.numpy(), torch.zeros(3, dtype=torch.int64))
