"""Public API: worked examples, result types, reductions, shapes, and every host backend against
float64 NumPy/scipy on fresh random inputs, within the numerics contract
(:mod:`ptx_numba.contract`): per-row CE and LSE within ``tolerance(dtype)`` of the float64 value
computed from the same (narrowed) input values, relative to ``max(1, |exact|)``.
"""
import math

import ml_dtypes
import numpy as np
import pytest

import ptx_numba as pn
from exact import assert_close, cast, ce64, lse64
from ptx_numba import _dispatch
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64, tolerance

HOST_BACKENDS = [b for b in pn.available_backends() if b != "cuda"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    yield
    _dispatch._reset_for_tests()


# ------------------------------------------------------------------------------------------
# helpers: float64 ground truth from the exact input values
# ------------------------------------------------------------------------------------------
def reduced_tol(want_rows, valid, tol):
    """The per-row bound summed: |sum error| <= tol * sum max(1, |ce_i|)."""
    return tol * float(np.sum(np.maximum(1.0, np.abs(want_rows[valid])))) + 1e-300


def hard_rows(rng, v):
    """A batch mixing every case the contract names, one kind per row (labels alongside)."""
    rows, labels, kinds = [], [], []

    def add(kind, row, label):
        rows.append(row)
        labels.append(label)
        kinds.append(kind)

    for scale in (1.0, 5.0):
        add(f"normal*{scale}", rng.normal(0, scale, v), int(rng.integers(v)))
    add("offset+3e4", rng.normal(0, 2, v) + 3e4, int(rng.integers(v)))
    add("offset-3e4", rng.normal(0, 2, v) - 3e4, int(rng.integers(v)))
    spike = rng.normal(0, 1, v)
    k = int(rng.integers(v))
    spike[k] += 60.0
    add("spike+60 labelled", spike, k)
    add("spike+60 other", spike.copy(), int((k + 1) % v) if v > 1 else 0)
    add("constant", np.full(v, float(rng.normal(0, 10))), int(rng.integers(v)))
    add("zeros", np.zeros(v), int(rng.integers(v)))
    masked = rng.normal(0, 3, v)
    keep = int(rng.integers(v))
    masked[rng.random(v) < 0.6] = -np.inf
    masked[keep] = float(rng.normal())
    add("-inf entries", masked, keep)
    single = np.full(v, -np.inf)
    single[keep] = 2.5
    add("single finite", single, keep)
    add("ignored", rng.normal(0, 3, v), -100)
    add("ignored huge", np.full(v, 1e4) * rng.choice([-1, 1]), -100)
    return np.array(rows), np.array(labels), kinds


# ------------------------------------------------------------------------------------------
# documented worked examples
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto"] + HOST_BACKENDS)
def test_worked_example_1(backend):
    r = pn.ptx_loss(0.5, [[10, 0, 0], [0, 10, 0]], [0, 1], 0.1, backend=backend)
    assert tuple(round(v, 6) for v in r) == (0.500009, 0.000009, 0.000091)
    assert r.ce != round(r.ce, 6)  # unrounded


@pytest.mark.parametrize("backend", ["auto"] + HOST_BACKENDS)
def test_worked_example_2(backend):
    r = pn.ptx_loss(1.0, [[1, 1, 1], [1, 1, 1]], [0, 2], 0.5, backend=backend)
    assert tuple(round(v, 6) for v in r) == (1.549306, 0.549306, 1.098612)


def test_ptxloss_fields_and_types():
    r = pn.ptx_loss(np.float32(0.25), np.ones((2, 3), np.float32), np.array([0, 1]), np.float64(2.0))
    assert isinstance(r, pn.PTXLoss) and isinstance(r, tuple) and len(r) == 3
    assert r._fields == ("total", "ptx", "ce")
    total, ptx, ce = r
    assert (total, ptx, ce) == (r.total, r.ptx, r.ce)
    assert all(type(v) is float for v in r)
    assert r.ptx == 2.0 * r.ce and r.total == 0.25 + r.ptx
    assert r.ce == pytest.approx(math.log(3), rel=TOL_FLOAT32)


# ------------------------------------------------------------------------------------------
# reductions, shapes, empty batches
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_and_shapes(rng, backend, dtype):
    b, t, v = 3, 5, 11
    z = cast(rng.normal(0, 3, size=(b, t, v)), dtype)
    y = rng.integers(0, v, size=(b, t))
    y[0, :] = -100
    y[2, 3] = -100
    want = ce64(z, y)
    valid = y != -100
    tol = tolerance(dtype)
    none = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert isinstance(none, np.ndarray) and none.shape == (b, t)
    assert none.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert (none[~valid] == 0.0).all()
    assert_close(none, want, tol, "none")
    s = pn.cross_entropy(z, y, reduction="sum", backend=backend)
    m = pn.cross_entropy(z, y, reduction="mean", backend=backend)
    assert type(s) is float and type(m) is float
    assert abs(s - math.fsum(want[valid])) <= reduced_tol(want, valid, tol)
    assert abs(m - math.fsum(want[valid]) / valid.sum()) <= reduced_tol(want, valid, tol) / valid.sum()
    assert m == pytest.approx(s / valid.sum(), rel=1e-12)
    assert pn.cross_entropy(z, y, backend=backend) == m  # "mean" is the default
    lse = pn.logsumexp(z, backend=backend)
    assert lse.shape == (b, t) and lse.dtype == none.dtype
    assert_close(lse, lse64(z), tol, "lse")
    r = pn.ptx_loss(0.7, z, y, 0.3, backend=backend)
    assert r.ce == pytest.approx(m, rel=1e-12, abs=1e-300)
    assert r.ptx == 0.3 * r.ce and r.total == 0.7 + r.ptx


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 1), (2, 0, 7), (0, 3, 4)])
def test_empty_batch(backend, shape):
    z = np.zeros(shape, np.float32)
    y = np.zeros(shape[:-1], np.int64)
    assert pn.cross_entropy(z, y, backend=backend) == 0.0
    assert pn.cross_entropy(z, y, reduction="sum", backend=backend) == 0.0
    none = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert none.shape == shape[:-1] and none.dtype == np.float32
    assert pn.logsumexp(z, backend=backend).shape == shape[:-1]
    assert tuple(pn.ptx_loss(1.5, z, y, 0.2, backend=backend)) == (1.5, 0.0, 0.0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored(rng, backend, dtype):
    z = cast(rng.normal(0, 3, size=(4, 2, 9)), dtype)
    z[1, 1, 3] = np.nan  # an ignored row's content is irrelevant
    y = np.full((4, 2), 5)
    r = pn.ptx_loss(-0.25, z, y, 3.0, ignore_index=5, backend=backend)
    assert tuple(r) == (-0.25, 0.0, 0.0)
    assert pn.cross_entropy(z, y, ignore_index=5, backend=backend) == 0.0
    assert pn.cross_entropy(z, y, ignore_index=5, reduction="sum", backend=backend) == 0.0
    none = pn.cross_entropy(z, y, ignore_index=5, reduction="none", backend=backend)
    assert none.shape == (4, 2) and (none == 0.0).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_ignored_row_with_nan_does_not_poison(rng, backend):
    z = rng.normal(size=(3, 6))
    z[1, :] = np.nan
    y = np.array([2, -100, 4])
    want = ce64(z, y)
    assert pn.cross_entropy(z, y, reduction="none", backend=backend)[1] == 0.0
    assert pn.cross_entropy(z, y, backend=backend) == pytest.approx((want[0] + want[2]) / 2, rel=TOL_FLOAT64)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_leading_dims_flattened(rng, backend):
    z = rng.normal(size=(2, 3, 4, 7))
    y = rng.integers(0, 7, size=(2, 3, 4))
    flat = pn.cross_entropy(z.reshape(-1, 7), y.reshape(-1), reduction="none", backend=backend)
    nd = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert nd.shape == (2, 3, 4)
    np.testing.assert_allclose(nd.reshape(-1), flat, rtol=1e-13, atol=0)
    assert pn.logsumexp(z, backend=backend).shape == (2, 3, 4)
    assert pn.cross_entropy(z, y, backend=backend) == pytest.approx(flat.mean(), rel=1e-12)


# ------------------------------------------------------------------------------------------
# every host backend vs float64 scipy on the contract's hard cases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 2, 7, 33, 1000, 2049, 5003])
def test_backends_match_float64_on_hard_rows(rng, backend, dtype, v):
    z64, y, kinds = hard_rows(rng, v)
    z = cast(z64, dtype)
    tol = tolerance(dtype)
    # narrowing may have sent a label's logit somewhere else, never to -inf from a finite value
    want_lse, want_ce = lse64(z), ce64(z, y)
    ctx = f"{backend}/{dtype}/V={v}; row kinds {kinds}"
    assert_close(pn.logsumexp(z, backend=backend), want_lse, tol, "lse " + ctx, z)
    rows = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert_close(rows, want_ce, tol, "ce " + ctx, z)
    valid = y != -100
    s = pn.cross_entropy(z, y, reduction="sum", backend=backend)
    assert abs(s - math.fsum(want_ce[valid])) <= reduced_tol(want_ce, valid, tol), ctx
    r = pn.ptx_loss(0.1, z, y, 0.05, backend=backend)
    assert abs(r.ce - math.fsum(want_ce[valid]) / valid.sum()) <= reduced_tol(want_ce, valid, tol) / valid.sum(), ctx


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 70001), (3, 40000), (2, 2, 16385)])
def test_long_rows(rng, backend, dtype, shape):
    """Rows long enough to be split across threads/chunks, with the hard cases inside."""
    z64 = rng.normal(0, 2, size=shape)
    flat = z64.reshape(-1, shape[-1])
    flat[0, -1] += 60.0  # spike in the last chunk
    if flat.shape[0] > 1:
        flat[1] += 3e4
        flat[1, : shape[-1] // 2] = -np.inf
    if flat.shape[0] > 2:
        flat[2] = -3e4
    z = cast(z64, dtype)
    y = rng.integers(0, shape[-1], size=shape[:-1])
    tol = tolerance(dtype)
    assert_close(pn.logsumexp(z, backend=backend), lse64(z), tol, f"lse {backend}/{dtype}/{shape}")
    assert_close(pn.cross_entropy(z, y, reduction="none", backend=backend), ce64(z, y), tol, f"ce {backend}/{dtype}/{shape}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows_random_sizes(rng, backend, dtype):
    n, v = int(rng.integers(200, 700)), int(rng.integers(50, 300))
    z = cast(rng.normal(0, 4, size=(n, v)) + rng.uniform(-3e4, 3e4, size=(n, 1)), dtype)
    y = rng.integers(0, v, size=n)
    y[rng.random(n) < 0.2] = -100
    tol = tolerance(dtype)
    assert_close(pn.logsumexp(z, backend=backend), lse64(z), tol, f"lse n={n} v={v}")
    assert_close(pn.cross_entropy(z, y, reduction="none", backend=backend), ce64(z, y), tol, f"ce n={n} v={v}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("offset", [2.5e9, -7e11])
def test_float64_confident_ce_survives_huge_offsets(rng, backend, offset):
    # CE ~ 1e-7 far below ulp(lse) ~ 1e-4: only a cancellation-free evaluation keeps it
    z = rng.normal(0.0, 1.0, size=(6, 1500))
    y = rng.integers(0, 1500, size=6)
    z[np.arange(6), y] += 25.0
    z += offset
    want = lse64(z - z[np.arange(6), y][:, None])  # z - z_y is exact for close values
    got = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert np.all(np.abs(got - want) <= TOL_FLOAT64 * np.maximum(1.0, want)) and np.all(want > 1e-9)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_match_scipy(backend, dtype):
    inf, nan = np.inf, np.nan
    z64 = np.array(
        [
            [-inf, -inf, -inf, -inf],
            [inf, 0.0, 1.0, 2.0],
            [inf, -inf, 1.0, inf],
            [nan, 0.0, 1.0, 2.0],
            [nan, inf, -inf, 0.0],
            [-inf, -inf, 3.0, -inf],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    z = cast(z64, dtype)
    want = lse64(z)
    got = pn.logsumexp(z, backend=backend)
    np.testing.assert_array_equal(got[:5], want[:5].astype(got.dtype))  # the non-finite results
    assert_close(got[5:], want[5:], tolerance(dtype), "finite row")
    # CE: a labelled -inf logit in a row with finite entries is +inf; NaN rows give NaN
    y = np.array([-100, -100, -100, 1, -100, 0, 2])
    ce = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert ce[5] == np.inf and np.isnan(ce[3])
    assert (ce[[0, 1, 2, 4]] == 0.0).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bf16_signalling_nan_pattern(backend):
    bits = np.array([[0x7F81, 0x3F80, 0x0000]], dtype=np.uint16)  # sNaN, 1.0, 0.0
    z = bits.view(ml_dtypes.bfloat16)
    assert np.isnan(pn.logsumexp(z, backend=backend)[0])
    assert np.isnan(pn.cross_entropy(z, [1], backend=backend))
    assert pn.cross_entropy(z, [-100], backend=backend) == 0.0


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_integer_and_list_logits_computed_in_float64(rng, backend):
    z = rng.integers(-50, 50, size=(6, 9))
    y = rng.integers(0, 9, size=6)
    got = pn.cross_entropy(z.tolist(), y.tolist(), reduction="none", backend=backend)
    assert got.dtype == np.float64
    assert_close(got, ce64(z, y), TOL_FLOAT64, "int lists")


def test_auto_agrees_with_explicit(rng):
    z = rng.normal(size=(5, 40)).astype(np.float32)
    y = rng.integers(0, 40, size=5)
    auto = pn.cross_entropy(z, y, reduction="none")
    explicit = [pn.cross_entropy(z, y, reduction="none", backend=b) for b in HOST_BACKENDS]
    assert any(np.array_equal(auto, e) for e in explicit) or pn.available_backends()[0] == "cuda"


# ------------------------------------------------------------------------------------------
# torch CPU tensors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_tensors_match_torch_cross_entropy(rng, backend, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    b, t, v = 3, 4, 37
    t_dtype = getattr(torch, dtype)
    z = torch.from_numpy(rng.normal(0, 3, size=(b, t, v))).to(t_dtype)
    z[0, 0] += 3e4 if dtype != "float16" else 3e4  # fp16 holds 3e4 (max 65504)
    z.requires_grad_(True)
    y = torch.from_numpy(rng.integers(0, v, size=(b, t)))
    y[1, 2] = -100
    ref = F.cross_entropy(z.detach().double().reshape(-1, v), y.reshape(-1), ignore_index=-100, reduction="none")
    ref = ref.numpy().reshape(b, t)
    tol = tolerance(dtype)
    got = pn.cross_entropy(z, y, reduction="none", backend=backend)
    assert isinstance(got, np.ndarray) and got.shape == (b, t)
    assert_close(got, ref, tol, f"torch {dtype}")
    ref_mean = F.cross_entropy(z.detach().double().reshape(-1, v), y.reshape(-1)).item()
    assert abs(pn.cross_entropy(z, y, backend=backend) - ref_mean) <= tol * max(1.0, abs(ref_mean)) * 2
    ref_sum = F.cross_entropy(z.detach().double().reshape(-1, v), y.reshape(-1), reduction="sum").item()
    assert abs(pn.cross_entropy(z, y, reduction="sum", backend=backend) - ref_sum) <= reduced_tol(ref, y.numpy() != -100, tol)
    r = pn.ptx_loss(0.5, z, y, 0.1, backend=backend)
    assert abs(r.ce - ref_mean) <= tol * max(1.0, abs(ref_mean)) * 2
    lse = pn.logsumexp(z, backend=backend)
    assert_close(lse, torch.logsumexp(z.detach().double(), dim=-1).numpy(), tol, "torch lse")
    assert z.grad is None


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_torch_non_contiguous_and_all_ignored(rng, backend):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z = torch.from_numpy(rng.normal(size=(9, 6))).to(torch.bfloat16).t()  # [6, 9] non-contiguous
    y = torch.from_numpy(rng.integers(0, 9, size=6))
    ref = F.cross_entropy(z.double(), y, reduction="none").numpy()
    assert_close(pn.cross_entropy(z, y, reduction="none", backend=backend), ref, TOL_FLOAT32, "transposed")
    y_all = torch.full((6,), -100)
    assert math.isnan(F.cross_entropy(z.double(), y_all).item())  # torch: NaN ...
    assert pn.cross_entropy(z, y_all, backend=backend) == 0.0  # ... ours: 0.0 by contract
