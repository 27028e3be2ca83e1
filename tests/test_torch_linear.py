"""ptx_numba.torch.linear_cross_entropy against torch autograd of F.cross_entropy(h @ W.T + b, y)."""
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
pnt = pytest.importorskip("ptx_numba.torch")
_linear = pytest.importorskip("ptx_numba.torch._linear")

from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64  # noqa: E402

IGN = -100


def _t(rng, shape, dtype=torch.float64, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype).requires_grad_(True)


def _labels(rng, shape, vocab):
    y = rng.integers(0, vocab, size=shape)
    y[rng.random(shape) < 0.25] = IGN
    y.reshape(-1)[0] = 1
    return torch.from_numpy(y)


def _torch_loss(h, w, b, y, reduction, **kw):
    logits = h @ w.T + (b if b is not None else 0)
    rows = F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=IGN, reduction="none", **kw)
    if reduction == "none":
        return rows.reshape(y.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / int((y != IGN).sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(rng, reduction, with_bias):
    h, w = _t(rng, (2, 3, 4)), _t(rng, (5, 4))
    b = _t(rng, (5,)) if with_bias else None
    y = _labels(rng, (2, 3), 5)
    args = (h, w, b) if with_bias else (h, w)

    def fn(h, w, b=None):
        return pnt.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=4)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_autograd(rng, reduction, dtype):
    h, w, b = _t(rng, (3, 7, 16), dtype), _t(rng, (37, 16), dtype, 0.5), _t(rng, (37,), dtype)
    y = _labels(rng, (3, 7), 37)
    up = torch.from_numpy(rng.standard_normal((3, 7))).to(dtype) if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    loss = pnt.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, z_loss=0.01, chunk_size=5)
    assert loss.dtype == dtype and loss.shape == (y.shape if reduction == "none" else ())
    (loss * up).sum().backward()
    ours = (h.grad, w.grad, b.grad)
    e = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    logits = e[0] @ e[1].T + e[2]
    flat = logits.reshape(-1, 37)
    rows = F.cross_entropy(flat, y.reshape(-1), ignore_index=IGN, reduction="none")
    rows = rows + torch.where(y.reshape(-1) != IGN, 0.01 * torch.logsumexp(flat, -1) ** 2, torch.zeros(()))
    exact = {"none": rows.reshape(y.shape), "sum": rows.sum(), "mean": rows.sum() / int((y != IGN).sum())}[reduction]
    tol = TOL_FLOAT64 if dtype == torch.float64 else TOL_FLOAT32
    assert torch.allclose(loss.detach().double(), exact.detach(), atol=tol, rtol=tol)
    (exact * up.double()).sum().backward()
    for got, ref in zip(ours, e):
        assert got.dtype == dtype
        assert torch.allclose(got.double(), ref.grad, atol=tol * max(1.0, float(ref.grad.abs().max())), rtol=0)


def test_bf16_inputs_get_bf16_gradients(rng):
    h, w = _t(rng, (9, 8), torch.bfloat16), _t(rng, (21, 8), torch.bfloat16)
    y = _labels(rng, (9,), 21)
    pnt.linear_cross_entropy(h, w, y).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    e = [t.detach().double().requires_grad_(True) for t in (h, w)]
    _torch_loss(e[0], e[1], None, y, "mean").backward()
    for got, ref in zip((h.grad, w.grad), e):  # float32 products, one rounding to bfloat16 at the end
        assert ((got.double() - ref.grad).abs() <= 2.0**-8 * ref.grad.abs() + 1e-6).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_chunk_loop_equals_core(rng, reduction):
    """The chunk loop that CUDA tensors take, run on CPU tensors, gives the core's results."""
    h, w, b = _t(rng, (11, 6), torch.float32), _t(rng, (13, 6), torch.float32), _t(rng, (13,), torch.float32)
    y = _labels(rng, (11,), 13)
    opts = dict(ignore_index=IGN, reduction=reduction, label_smoothing=0.2, z_loss=0.0, softcap=5.0,
                chunk_size=4, backend="auto")
    g = rng.standard_normal(11) if reduction == "none" else 1.0
    core = _linear._run(h, w, b, y, opts, g)
    loop = _linear._chunked(h, w, b, y, opts, g)
    for a, c in zip(core, loop):
        assert torch.allclose(a.float(), c.float(), atol=1e-6, rtol=1e-6)


def test_no_grad_and_frozen_weight(rng):
    h, w = _t(rng, (5, 4)), _t(rng, (7, 4))
    y = _labels(rng, (5,), 7)
    with torch.no_grad():
        plain = pnt.linear_cross_entropy(h, w, y)
    assert plain.grad_fn is None
    w.requires_grad_(False)
    loss = pnt.linear_cross_entropy(h, w, y)
    assert float(loss.detach()) == pytest.approx(float(plain), abs=1e-12)
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_all_ignored_and_bad_input(rng):
    h, w = _t(rng, (4, 3), torch.float32), _t(rng, (6, 3), torch.float32)
    loss = pnt.linear_cross_entropy(h, w, torch.full((4,), IGN))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        pnt.linear_cross_entropy(h, w[0], y)
    with pytest.raises(ValueError, match="does not match weight"):
        pnt.linear_cross_entropy(h, w[:, :2], y)
    with pytest.raises(ValueError, match="bias shape"):
        pnt.linear_cross_entropy(h, w, y, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="chunk_size"):
        pnt.linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        pnt.linear_cross_entropy(torch.ones(4, 3, dtype=torch.int64), w, y)
    with pytest.raises(ValueError, match="labels shape"):
        pnt.linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.int64))
