"""ptx_numba.torch: cross entropy, the PTX loss and PTXLoss against PyTorch's own autograd."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
pnt = pytest.importorskip("ptx_numba.torch")

from ptx_numba.contract import TOL_FLOAT32  # noqa: E402

IGN = -100


def _tensor(rng, shape, dtype=torch.float64, scale=3.0, requires_grad=True):
    t = torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _labels(rng, shape, vocab, ignored=0.25):
    y = rng.integers(0, vocab, size=shape)
    y[rng.random(shape) < ignored] = IGN
    return torch.from_numpy(y)


def _torch_ce(z, y, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The same loss written with torch ops (float64 when ``z`` is)."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat, yf = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    rows = F.cross_entropy(flat, yf, ignore_index=IGN, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        valid = yf != IGN
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(flat, dim=-1) ** 2, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(y.shape)
    if reduction == "sum":
        return rows.sum()
    count = int((yf != IGN).sum())
    return rows.sum() / count if count else rows.sum() * 0.0


def _f(t):
    return float(t.detach())


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


# ------------------------------------------------------------------------------------------------
# gradcheck (float64)
# ------------------------------------------------------------------------------------------------
OPTIONS = [dict(), dict(label_smoothing=0.2), dict(z_loss=0.05), dict(softcap=2.5),
           dict(label_smoothing=0.1, z_loss=0.01, softcap=4.0)]


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_cross_entropy_gradcheck(rng, shape, reduction, options):
    x = _tensor(rng, shape)
    y = _labels(rng, shape[:-1], shape[-1])
    y.view(-1)[0] = 1  # at least one valid row
    assert torch.autograd.gradcheck(lambda z: pnt.cross_entropy(z, y, reduction=reduction, **options), (x,))


def test_ptx_loss_gradcheck_logits_and_rl_loss(rng):
    x = _tensor(rng, (2, 3, 4))
    y = _labels(rng, (2, 3), 4)
    y[0, 0] = 2
    rl = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, z: pnt.ptx_loss(r, z, y, 0.3, label_smoothing=0.1)[0], (rl, x))
    assert torch.autograd.gradcheck(lambda r, z: pnt.ptx_loss(r, z, y, 0.3)[1], (rl, x))


# ------------------------------------------------------------------------------------------------
# against torch autograd, every dtype
# ------------------------------------------------------------------------------------------------
def _dtype_bound(dtype, exact, scale):
    """Allowed |ours - exact| per element.

    ``scale``: per row, the upstream weight or the row's largest exact entry, whichever is larger
    (z-loss multiplies a row's gradient by ``1 + 2 z_loss lse``, large at a 3e4 offset).
    float32: the contract's ``TOL_FLOAT32`` relative to that scale. 16-bit:
    one rounding to the dtype (half an ulp, at most 2**-8 / 2**-11 relative), plus the float32 error
    of the value before rounding, absolute against the scale (a softcap's ``1 - tanh**2`` factor is
    formed by cancellation where ``|z| >> c``, so tiny entries are not relatively exact there).
    """
    if dtype == torch.float32:
        return TOL_FLOAT32 * scale.expand_as(exact)
    f32 = 2.0**-22 * scale
    if dtype == torch.bfloat16:
        return 2.0**-8 * exact.abs() + f32
    return 2.0**-11 * exact.abs() + 2.0**-25 + f32  # float16: half an ulp, or half a subnormal step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS)
def test_cross_entropy_matches_torch(rng, dtype, options):
    shape = (37, 29)
    x = _tensor(rng, shape, dtype=dtype, scale=4.0)
    x.data[3, :] += 3e4 if dtype == torch.float32 else 0.0  # a shifted row (float32 only: 16-bit can't hold it)
    x.data[5, 7] = 40.0  # a dominant logit: p_y close to 1 when labels[5] == 7
    y = _labels(rng, shape[:-1], shape[-1])
    y[5] = 7
    ours = pnt.cross_entropy(x, y, **options)
    assert ours.dtype == torch.float32 and ours.shape == ()
    exact_x = x.detach().double()  # the same values, in float64
    exact = _torch_ce(exact_x, y, **options)
    assert abs(_f(ours) - _f(exact)) <= TOL_FLOAT32 * max(1.0, abs(_f(exact)))
    ours.backward()
    g_exact = _grad(lambda z: _torch_ce(z, y, **options), exact_x)
    assert x.grad.dtype == dtype
    scale = torch.clamp(g_exact.abs().amax(dim=-1, keepdim=True), min=1.0 / int((y != IGN).sum()))
    err = (x.grad.double() - g_exact).abs()
    assert (err <= _dtype_bound(dtype, g_exact, scale)).all(), float(err.max())
    assert (x.grad[y == IGN] == 0).all()
    if dtype != torch.float32 and not options:
        # comparison only: torch's own 16-bit path, relative to the largest exact entry
        g_torch = _grad(lambda z: F.cross_entropy(z, y, ignore_index=IGN), x.detach()).double()
        label = (y != IGN).nonzero().squeeze(1)
        ex, ours_y, torch_y = (g[label, y[label]] for g in (g_exact, x.grad.double(), g_torch))
        keep = ex.abs() > 1e-12  # below, 1 - p_y is lost to float64 cancellation in the reference too
        ex, ours_y, torch_y = ex[keep], ours_y[keep], torch_y[keep]
        print(f"{dtype}: max err / max |g|: ptx_numba {float(err.max() / g_exact.abs().max()):.2e}, torch "
              f"{float((g_torch - g_exact).abs().max() / g_exact.abs().max()):.2e}; label entries, max "
              f"relative err: ptx_numba {float(((ours_y - ex) / ex).abs().max()):.2e}, "
              f"torch {float(((torch_y - ex) / ex).abs().max()):.2e}")


def test_bf16_label_entry_keeps_p_minus_one(rng):
    """p_y within a bf16 ulp of 1: the label entry is p_y - 1 (tiny), not 0 (Liger-Kernel #1329)."""
    x = torch.zeros(4, 50, dtype=torch.bfloat16)
    x[:, 3] = 12.0
    x.requires_grad_(True)
    y = torch.full((4,), 3)
    pnt.cross_entropy(x, y, reduction="sum").backward()
    exact = _grad(lambda z: F.cross_entropy(z, y, reduction="sum"), x.detach().double())
    assert _f(exact[0, 3]) < 0 and _f(x.grad[0, 3]) != 0.0
    assert ((x.grad.double() - exact).abs() <= 2.0**-8 * exact.abs()).all()


def test_b_t_v_and_shifted_slice(rng):
    """[B, T, V] input and the ``logits[:, :-1]`` slice (read in place), gradient through the slice."""
    full = _tensor(rng, (3, 6, 11), dtype=torch.float32)
    tokens = torch.from_numpy(rng.integers(0, 11, size=(3, 6)))
    tokens[1, 2] = IGN
    before = full.detach().clone()
    loss = pnt.cross_entropy(full[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.equal(full.detach(), before)
    exact_full = full.detach().double().requires_grad_(True)
    exact = F.cross_entropy(exact_full[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1), ignore_index=IGN)
    exact.backward()
    assert abs(_f(loss) - _f(exact)) <= TOL_FLOAT32 * max(1.0, _f(exact))
    assert torch.allclose(full.grad.double(), exact_full.grad, atol=1e-6, rtol=0)
    assert (full.grad[:, -1] == 0).all()


def test_strided_and_masked_logits(rng):
    """Logits with a non-unit stride along V (a transpose) and -inf masks."""
    base = _tensor(rng, (9, 13), dtype=torch.float64, requires_grad=False)
    base[2, [0, 4]] = -np.inf
    x = base.T.contiguous().requires_grad_(True)  # [V, N] storage
    logits = x.T  # [N, V] with stride 1 between rows and N along V
    assert logits.stride() == (1, 9)
    y = _labels(rng, (9,), 13)
    y[2] = 1
    loss = pnt.cross_entropy(logits, y, reduction="sum")
    loss.backward()
    exact = _grad(lambda z: F.cross_entropy(z, y, ignore_index=IGN, reduction="sum"), base)
    assert torch.allclose(x.grad.T, exact, atol=1e-12, rtol=0)
    assert (x.grad.T[2, [0, 4]] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_and_zero_gradient(rng, reduction):
    x = _tensor(rng, (4, 7), dtype=torch.float32)
    y = torch.full((4,), IGN)
    loss = pnt.cross_entropy(x, y, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_empty_batch(rng):
    x = torch.zeros(0, 5, requires_grad=True)
    loss = pnt.cross_entropy(x, torch.zeros(0, dtype=torch.int64))
    assert _f(loss) == 0.0
    loss.backward()
    assert x.grad.shape == (0, 5)


def test_reduction_none_non_uniform_upstream(rng):
    """Each row's upstream gradient scales only its own row (Liger-Kernel #678)."""
    x = _tensor(rng, (2, 5, 9), dtype=torch.float32)
    y = _labels(rng, (2, 5), 9)
    w = torch.from_numpy(rng.standard_normal((2, 5))).float()
    rows = pnt.cross_entropy(x, y, reduction="none", z_loss=0.01)
    assert rows.shape == y.shape and rows.dtype == torch.float32
    assert (rows[y == IGN] == 0).all()
    (rows * w).sum().backward()
    exact = _grad(lambda z: (_torch_ce(z, y, "none", z_loss=0.01) * w.double()).sum(), x.detach().double())
    # absolute: at least as strict as the contract's bound relative to max(1, |exact|)
    assert torch.allclose(x.grad.double(), exact, atol=TOL_FLOAT32, rtol=0)


def test_result_dtypes_and_float64(rng):
    x64 = _tensor(rng, (5, 6))
    y = _labels(rng, (5,), 6)
    assert pnt.cross_entropy(x64, y).dtype == torch.float64
    assert pnt.cross_entropy(x64.detach().half(), y, reduction="none").dtype == torch.float32
    ours = pnt.cross_entropy(x64, y, label_smoothing=0.3)
    exact = _torch_ce(x64.detach(), y, label_smoothing=0.3)
    assert abs(_f(ours) - _f(exact)) <= 1e-12 * max(1.0, abs(_f(exact)))


def test_forward_saves_only_row_statistics(rng):
    x = _tensor(rng, (6, 40), dtype=torch.float32)
    y = _labels(rng, (6,), 40)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pnt.cross_entropy(x, y, label_smoothing=0.1)
    assert len(packed) == 1 and packed[0].data_ptr() == x.data_ptr()  # the input itself, no new buffer
    for field in loss.grad_fn.saved.stats:
        assert field is None or field.shape == (6,)


# ------------------------------------------------------------------------------------------------
# PTX loss
# ------------------------------------------------------------------------------------------------
def test_ptx_loss_values_and_gradients(rng):
    x = _tensor(rng, (2, 4, 10), dtype=torch.float32)
    y = _labels(rng, (2, 4), 10)
    rl = torch.tensor(1.5, requires_grad=True)
    total, ptx, ce = pnt.ptx_loss(rl, x, y, 0.25)
    assert all(t.shape == () for t in (total, ptx, ce))
    exact_ce = float(_torch_ce(x.detach().double(), y))
    assert abs(_f(ce) - exact_ce) <= TOL_FLOAT32 * max(1.0, exact_ce)
    assert abs(_f(ptx) - 0.25 * _f(ce)) <= 1e-6 and abs(_f(total) - 1.5 - _f(ptx)) <= 1e-6
    total.backward()
    assert _f(rl.grad) == 1.0
    exact = _grad(lambda z: 0.25 * _torch_ce(z, y), x.detach().double())
    assert torch.allclose(x.grad.double(), exact, atol=1e-6, rtol=0)


def test_ptx_loss_module_matches_function(rng):
    x = _tensor(rng, (6, 8), dtype=torch.float32)
    y = _labels(rng, (6,), 8)
    loss_fn = pnt.PTXLoss(beta=0.5, label_smoothing=0.1)
    assert "beta=0.5" in repr(loss_fn)
    rl = torch.tensor(0.2, requires_grad=True)
    got = loss_fn(rl, x, y)
    want = pnt.ptx_loss(rl.detach(), x.detach(), y, 0.5, label_smoothing=0.1)
    assert all(_f(a) == _f(b) for a, b in zip(got, want))
    got[0].backward()
    assert _f(rl.grad) == 1.0 and x.grad is not None
    assert pnt.ptx_loss(0.3, x.detach(), torch.full((6,), IGN), 0.5)[0].item() == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------
# in-place backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_default_and_default_never_writes(rng, dtype):
    leaf = _tensor(rng, (2, 5, 12), dtype=dtype)
    y = _labels(rng, (2, 5), 12)
    before = leaf.detach().clone()
    pnt.cross_entropy(leaf * 1, y, label_smoothing=0.1).backward()
    assert torch.equal(leaf.detach(), before)  # the default wrote nothing into the caller's logits
    default = leaf.grad.clone()
    leaf.grad = None
    logits = leaf * 1  # a non-leaf, as a model's output would be
    pnt.cross_entropy(logits, y, label_smoothing=0.1, inplace_backward=True).backward()
    assert torch.equal(leaf.grad, default)
    assert torch.equal(logits.detach(), default)  # the logits' storage now holds the gradient


def test_inplace_backward_stale_logits_raise(rng):
    """A node that saved the logits and runs after the in-place backward raises (no silent corruption)."""
    leaf = _tensor(rng, (4, 6), dtype=torch.float32)
    y = _labels(rng, (4,), 6)
    logits = leaf * 1
    other = (logits ** 2).sum()  # saves the logits
    loss = other + pnt.cross_entropy(logits, y, inplace_backward=True)  # created last: its backward runs first
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_default_backward_with_shared_logits_is_exact(rng):
    x = _tensor(rng, (4, 6))
    y = _labels(rng, (4,), 6)
    g = _grad(lambda z: (z ** 2).sum() + pnt.cross_entropy(z, y), x)
    exact = _grad(lambda z: (z ** 2).sum() + _torch_ce(z, y), x)
    assert torch.allclose(g, exact, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input(rng):
    x = _tensor(rng, (3, 4), dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        pnt.cross_entropy(x.detach().numpy(), y)
    with pytest.raises(TypeError, match="floating-point"):
        pnt.cross_entropy(torch.ones(3, 4, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="reduction"):
        pnt.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        pnt.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="out of range"):
        pnt.cross_entropy(x, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="inplace_backward"):
        pnt.cross_entropy(x, y, inplace_backward="yes")
    with pytest.raises(ValueError, match="rl_loss"):
        pnt.ptx_loss(torch.ones(2), x, y, 0.1)
    with pytest.raises(ValueError, match="softcap"):
        pnt.PTXLoss(softcap=0.0)
    with pytest.raises(ValueError, match="beta"):
        pnt.PTXLoss(beta=float("nan"))


def test_guide_examples_run():
    """The code blocks of docs/guide-torch.md run as written and train (gradients reach the parameters)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "guide-torch.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    scope = {}
    for block in blocks:
        exec(compile(block, "guide-torch.md", "exec"), scope)
    assert scope["policy"].weight.grad is not None and scope["h"].grad is not None
    assert torch.isfinite(scope["total"].detach())
