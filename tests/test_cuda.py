"""Tests of the ``cuda`` backend: on Numba's CUDA simulator here, on the GPU where there is one.

The simulator runs one Python thread per GPU thread, so shapes stay tiny; ``small_launch`` shrinks
the block to 32 threads and the grid to 2 blocks so that tiny inputs still cross blocks, partial
4-element steps and the grid-stride loop over rows. Tests needing a real GPU are marked ``gpu``.

Everything goes through the public API (``pn.cross_entropy(device_array, ...)`` and friends), as a
user would call it; the backend's protocol kernels have their own tests in ``test_gpu_rowpass.py``
and ``test_gpu_backward.py``.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

numba_cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

import ptx_numba as pn  # noqa: E402
from exact import ce64, ce_grad64, entropy64, kl64, lse64, logp64  # noqa: E402
from ptx_numba import _dispatch, config, reference  # noqa: E402
from ptx_numba._validate import prepare  # noqa: E402
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64, rel_error  # noqa: E402

_dispatch._reset_for_tests()  # forget an earlier failed import of the backend
pc = importlib.import_module("ptx_numba.gpu")
_ok, _why = pc.is_available()
if not _ok:
    pytest.skip(f"cuda backend unavailable: {_why}", allow_module_level=True)

from ptx_numba.gpu import backward as gpu_backward  # noqa: E402
from ptx_numba.gpu import kernels  # noqa: E402
from ptx_numba.gpu import rowpass as gpu_rowpass  # noqa: E402

cuda = numba_cuda
ON_SIM = kernels.on_simulator()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(ON_SIM, reason="needs a real CUDA GPU (running on the simulator)")
IGN = -100


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_launch(monkeypatch):
    """32 threads per block and 2 blocks, so tiny inputs exercise every path."""
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 2)


@pytest.fixture
def device_api():
    """Device arrays of this run (simulator or GPU) must reach the public API as device input."""
    assert pn.api.is_device_array(cuda.to_device(np.zeros((1, 1), np.float32)))


def sum_tol(exact_rows):
    """The contract's bound on a sum of rows: each row may be off by TOL_FLOAT32 * max(1, |row|)."""
    return TOL_FLOAT32 * float(np.sum(np.maximum(1.0, np.abs(exact_rows))))


def hard_logits(rng, n, v, dtype=np.float32):
    """Rows built to break naive kernels: offsets, spikes, constants, masked entries."""
    z = rng.standard_normal((n, v)) * 4
    kinds = ["plain", "plus", "minus", "spike", "const", "masked"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "plus":
            z[i] += 3e4
        elif kind == "minus":
            z[i] -= 3e4
        elif kind == "spike":
            z[i, rng.integers(v)] += 60.0
        elif kind == "const":
            z[i] = 7.25
        elif kind == "masked" and v > 1:
            keep = rng.integers(v)
            mask = rng.random(v) < 0.7
            mask[keep] = False
            z[i, mask] = -np.inf
    return z.astype(dtype)


def labels_for(rng, z, ignore_every=3):
    """Labels on finite entries, with every ``ignore_every``-th row ignored."""
    v = z.shape[-1]
    flat = np.asarray(z, dtype=np.float64).reshape(-1, v)
    y = np.array([rng.choice(np.flatnonzero(np.isfinite(row))) for row in flat], dtype=np.int64)
    y[::ignore_every] = IGN
    return y.reshape(z.shape[:-1]) if z.ndim > 2 else y


SHAPES = [(1, 1), (3, 31), (5, 32), (4, 33), (3, 129), (5, 300)]


def ce_rows(z, y, **kw):
    """Per-row CE on the cuda backend as a float64 host array (input on host or device)."""
    got = pn.cross_entropy(z, y, reduction="none", backend="cuda", **kw)
    return np.asarray(got.copy_to_host() if hasattr(got, "copy_to_host") else got, dtype=np.float64)


def lse_rows(z):
    got = pn.logsumexp(z, backend="cuda")
    return np.asarray(got.copy_to_host() if hasattr(got, "copy_to_host") else got, dtype=np.float64)


def is_device(obj):
    return not isinstance(obj, np.ndarray) and hasattr(obj, "copy_to_host")


# ------------------------------------------------------------------------------------------------
# availability and configuration
# ------------------------------------------------------------------------------------------------
def test_available_here_and_auto_keeps_host_input_off_the_simulator():
    assert pc.is_available() == (True, "")
    assert pc.NAME == "cuda" and pc.BACKEND.name == "cuda"
    assert not pc.prefers_host_input(config.CUDA_AUTO_MIN_HOST_BYTES - 1)
    if ON_SIM:
        assert not pc.prefers_host_input(10 * config.CUDA_AUTO_MIN_HOST_BYTES)


def test_the_transitional_module_functions_are_gone():
    # The public layer calls BACKEND.row_stats / row_grad; the old module-level entry points went.
    for name in ("logsumexp_rows", "cross_entropy_rows", "cross_entropy_sum", "device_cross_entropy",
                 "device_cross_entropy_sum", "device_logsumexp"):
        assert not hasattr(pc, name), name
    with pytest.raises(ImportError):
        importlib.import_module("ptx_numba.gpu._legacy")


def test_unavailable_reason_mentions_the_simulator(monkeypatch):
    def no_numba_cuda():
        raise ImportError("No module named 'numba_cuda'")

    monkeypatch.setattr(pc, "_numba_cuda", no_numba_cuda)
    ok, reason = pc.is_available()
    assert not ok and "NUMBA_ENABLE_CUDASIM=1" in reason
    assert not pc.prefers_host_input(1 << 40)


def test_explicit_backend_when_unavailable_names_the_simulator(monkeypatch):
    reason = "no usable CUDA GPU; set NUMBA_ENABLE_CUDASIM=1 to use the simulator"
    _dispatch._reset_for_tests()
    monkeypatch.setattr(pc, "is_available", lambda: (False, reason))
    try:
        with pytest.raises(pn.BackendUnavailableError, match="NUMBA_ENABLE_CUDASIM=1"):
            pn.cross_entropy(np.zeros((2, 3)), [0, 1], backend="cuda")
        with pytest.raises(pn.BackendUnavailableError, match="simulator"):
            pn.ptx_loss(0.0, np.zeros((2, 3)), [0, 1], 0.1, backend="cuda")
    finally:
        monkeypatch.undo()
        _dispatch._reset_for_tests()
    assert "cuda" in pn.available_backends()


def test_backend_imports_in_a_fresh_process():
    code = "from ptx_numba import _dispatch; print(repr(_dispatch.unavailable_reason('cuda')))"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM=os.environ.get("NUMBA_ENABLE_CUDASIM", "1"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "''", res.stdout + res.stderr


@pytest.mark.parametrize("tpb", [0, 48, 2048])
def test_bad_threads_per_block(monkeypatch, tpb):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", tpb)
    with pytest.raises(ValueError, match="CUDA_THREADS_PER_BLOCK"):
        pn.logsumexp(np.zeros((2, 3), np.float32), backend="cuda")


# ------------------------------------------------------------------------------------------------
# host batches against float64 NumPy / SciPy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_logsumexp(rng, small_launch, shape):
    z = (rng.standard_normal(shape) * 5).astype(np.float32)
    got = pn.logsumexp(z, backend="cuda")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (shape[0],)
    assert rel_error(got, lse64(z)) < TOL_FLOAT32


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_rows_and_sum(rng, small_launch, shape):
    z = hard_logits(rng, *shape)
    y = labels_for(rng, z)
    rows = pn.cross_entropy(z, y, reduction="none", backend="cuda")
    assert isinstance(rows, np.ndarray) and rows.dtype == np.float32 and rows.shape == (shape[0],)
    assert rel_error(rows, ce64(z, y).ravel()) < TOL_FLOAT32
    assert np.all(rows[y == IGN] == 0.0)
    total = pn.cross_entropy(z, y, reduction="sum", backend="cuda")
    assert isinstance(total, float)
    assert abs(total - ce64(z, y).ravel().sum()) <= sum_tol(ce64(z, y).ravel()[y != IGN])


@pytest.mark.parametrize("tpb", [64, 256])
def test_other_block_sizes(rng, monkeypatch, tpb):
    # 256 is the default; 300 > 256 still leaves a partial step in every row.
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", tpb)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 1)
    z = hard_logits(rng, 3, 300)
    y = labels_for(rng, z, ignore_every=2)
    assert rel_error(ce_rows(z, y), ce64(z, y).ravel()) < TOL_FLOAT32
    assert rel_error(lse_rows(z), lse64(z)) < TOL_FLOAT32


def test_hard_rows_float32(rng, small_launch):
    z = hard_logits(rng, 12, 70)
    y = labels_for(rng, z, ignore_every=5)
    assert rel_error(lse_rows(z), lse64(z)) < TOL_FLOAT32
    assert rel_error(ce_rows(z, y), ce64(z, y).ravel()) < TOL_FLOAT32


def test_special_values_match_reference(small_launch):
    inf, nan = np.inf, np.nan
    z = np.array(
        [
            [-inf, -inf, -inf, -inf, -inf],  # all masked: lse -inf, ce nan
            [1.0, inf, 2.0, -inf, 0.0],  # +inf: lse +inf, ce +inf (label on a finite entry)
            [1.0, inf, 2.0, inf, 0.0],  # label on +inf: ce nan
            [1.0, nan, 2.0, 3.0, 0.0],  # nan propagates
            [-inf, -inf, nan, -inf, -inf],
            [inf, nan, 0.0, 0.0, 0.0],
            [-inf, 4.0, -inf, -inf, -inf],  # one finite entry
            [0.0, 1.0, -inf, 2.0, 3.0],  # label on -inf: ce +inf
        ],
        dtype=np.float32,
    )
    y = np.array([0, 0, 1, 0, 0, 2, 1, 2], dtype=np.int64)
    with np.errstate(all="ignore"):
        want_lse = pn.logsumexp(z, backend="reference")
        want_ce = pn.cross_entropy(z, y, reduction="none", backend="reference")
    # assert_allclose treats equal infinities and NaN in the same places as equal.
    np.testing.assert_allclose(lse_rows(z), want_lse, rtol=TOL_FLOAT32, atol=0)
    np.testing.assert_allclose(ce_rows(z, y), want_ce, rtol=TOL_FLOAT32, atol=0)
    assert np.isnan(pn.cross_entropy(z, y, reduction="sum", backend="cuda"))


def test_float64(rng, small_launch):
    z = hard_logits(rng, 7, 45, np.float64)
    y = labels_for(rng, z)
    lse = pn.logsumexp(z, backend="cuda")
    assert lse.dtype == np.float64 and rel_error(lse, lse64(z)) < TOL_FLOAT64
    rows = pn.cross_entropy(z, y, reduction="none", backend="cuda")
    assert rows.dtype == np.float64 and rel_error(rows, ce64(z, y).ravel()) < TOL_FLOAT64
    total = pn.cross_entropy(z, y, reduction="sum", backend="cuda")
    assert abs(total - ce64(z, y).ravel().sum()) < TOL_FLOAT64 * z.shape[0]


def test_half_encodings_through_the_api(rng, small_launch):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    z32 = hard_logits(rng, 6, 40)
    z32[np.abs(z32) > 1e4] = 3.0  # keep values representable in float16
    y = labels_for(rng, z32)
    for half in (np.float16, ml_dtypes.bfloat16):
        zh = z32.astype(half)
        exact = ce64(zh.astype(np.float64), y).ravel()  # exact on the rounded inputs
        got = pn.cross_entropy(zh, y, reduction="none", backend="cuda")
        assert got.dtype == np.float32 and rel_error(got, exact) < TOL_FLOAT32
        got_lse = pn.logsumexp(zh, backend="cuda")
        assert rel_error(got_lse, lse64(zh.astype(np.float64))) < TOL_FLOAT32
        mean = pn.cross_entropy(zh, y, backend="cuda")
        valid = exact[y != IGN]
        assert abs(mean - valid.mean()) <= sum_tol(valid) / valid.size


def test_empty_and_all_ignored(rng, small_launch):
    z = np.zeros((0, 7), np.float32)
    y = np.zeros(0, np.int64)
    assert pn.logsumexp(z, backend="cuda").shape == (0,)
    assert pn.cross_entropy(z, y, reduction="none", backend="cuda").shape == (0,)
    assert pn.cross_entropy(z, y, reduction="sum", backend="cuda") == 0.0
    assert pn.cross_entropy(z, y, backend="cuda") == 0.0
    z = rng.standard_normal((3, 7)).astype(np.float32)
    y = np.full(3, IGN)
    assert pn.cross_entropy(z, y, reduction="sum", backend="cuda") == 0.0
    np.testing.assert_array_equal(pn.cross_entropy(z, y, reduction="none", backend="cuda"), np.zeros(3))
    assert pn.cross_entropy(z, y, backend="cuda") == 0.0
    assert tuple(pn.ptx_loss(0.5, z, y, 0.1, backend="cuda")) == (0.5, 0.0, 0.0)
    loss, grad = pn.cross_entropy_and_grad(z, y, backend="cuda")
    assert loss == 0.0 and np.all(grad == 0.0)


def test_public_api_on_host_batches(rng, small_launch):
    z = hard_logits(rng, 6, 50).reshape(2, 3, 50)
    y = labels_for(rng, z)
    exact = ce64(z, y).ravel()
    rows = pn.cross_entropy(z, y, reduction="none", backend="cuda")
    assert isinstance(rows, np.ndarray) and rows.shape == (2, 3) and rows.dtype == np.float32
    assert rel_error(rows.ravel(), exact) < TOL_FLOAT32
    valid = exact[y.ravel() != IGN]
    assert abs(pn.cross_entropy(z, y, reduction="sum", backend="cuda") - exact.sum()) <= sum_tol(valid)
    lse = pn.logsumexp(z, backend="cuda")
    assert lse.shape == (2, 3) and rel_error(lse, lse64(z)) < TOL_FLOAT32
    res = pn.ptx_loss(1.5, z, y, 0.25, backend="cuda")
    ce = valid.mean()
    assert abs(res.ce - ce) <= sum_tol(valid) / valid.size
    assert res.ptx == 0.25 * res.ce and res.total == 1.5 + res.ptx


# ------------------------------------------------------------------------------------------------
# device input: results stay on the device
# ------------------------------------------------------------------------------------------------
def test_device_input_gives_device_results(rng, small_launch, device_api):
    z = hard_logits(rng, 6, 37)
    y = labels_for(rng, z)
    exact = ce64(z, y).ravel()
    d_z, d_y = cuda.to_device(z), cuda.to_device(y)
    lse = pn.logsumexp(d_z)  # auto sends device input to cuda
    assert is_device(lse) and lse.shape == (6,) and lse.dtype == np.float32
    assert rel_error(lse.copy_to_host(), lse64(z)) < TOL_FLOAT32
    rows = pn.cross_entropy(d_z, d_y, reduction="none")
    assert is_device(rows) and rows.shape == (6,) and rows.dtype == np.float32
    assert rel_error(rows.copy_to_host(), exact) < TOL_FLOAT32
    valid = exact[y != IGN]
    mean = pn.cross_entropy(d_z, d_y)
    assert isinstance(mean, float) and abs(mean - valid.mean()) <= sum_tol(valid) / valid.size
    assert abs(pn.cross_entropy(d_z, y, reduction="sum") - exact.sum()) <= sum_tol(valid)  # host labels too
    np.testing.assert_array_equal(d_z.copy_to_host(), z)  # the caller's logits are untouched


def test_device_float64_and_float16(rng, small_launch):
    z = hard_logits(rng, 5, 40, np.float64)
    y = labels_for(rng, z)
    rows = pn.cross_entropy(cuda.to_device(z), cuda.to_device(y), reduction="none")
    assert is_device(rows) and rows.dtype == np.float64
    assert rel_error(rows.copy_to_host(), ce64(z, y).ravel()) < TOL_FLOAT64
    z16 = np.where(np.abs(z) > 1e4, 1.0, z).astype(np.float16)
    rows = pn.cross_entropy(cuda.to_device(z16), cuda.to_device(y), reduction="none")
    assert rows.dtype == np.float32
    assert rel_error(rows.copy_to_host(), ce64(z16.astype(np.float64), y).ravel()) < TOL_FLOAT32


def test_device_batches_read_in_place(rng, small_launch):
    # The shifted-label pattern: logits[:, :-1] and labels[:, 1:] are strided views.
    z = hard_logits(rng, 2 * 5, 33).reshape(2, 5, 33)
    y = labels_for(rng, z)
    d_z, d_y = cuda.to_device(z), cuda.to_device(y)
    zs, ys = z[:, :-1], y[:, 1:]
    rows = pn.cross_entropy(d_z[:, :-1], d_y[:, 1:], reduction="none")
    assert rows.shape == (2, 4)
    assert rel_error(rows.copy_to_host().ravel(), ce64(zs, ys).ravel()) < TOL_FLOAT32
    lse = pn.logsumexp(d_z[:, ::2])
    assert lse.shape == (2, 3) and rel_error(lse.copy_to_host(), lse64(z[:, ::2])) < TOL_FLOAT32
    flat = z.reshape(10, 33)
    lse2 = pn.logsumexp(cuda.to_device(flat)[::3, 1:])  # a 2-D view strided both ways
    assert rel_error(lse2.copy_to_host(), lse64(flat[::3, 1:])) < TOL_FLOAT32
    z4 = z.reshape(2, 5, 1, 33)
    lse4 = pn.logsumexp(cuda.to_device(z4))
    assert lse4.shape == (2, 5, 1) and rel_error(lse4.copy_to_host(), lse64(z4)) < TOL_FLOAT32
    with pytest.raises(ValueError, match="non-contiguous GPU logits with 4 dimensions"):
        pn.logsumexp(cuda.to_device(z4)[:, ::2])


def test_device_empty_and_all_ignored(rng, small_launch):
    d_z = cuda.to_device(np.zeros((0, 5), np.float32))
    d_y = cuda.to_device(np.zeros(0, np.int64))
    assert pn.logsumexp(d_z).shape == (0,)
    assert pn.cross_entropy(d_z, d_y, reduction="none").shape == (0,)
    assert pn.cross_entropy(d_z, d_y) == 0.0
    assert pn.cross_entropy(d_z, d_y, reduction="sum") == 0.0
    z = cuda.to_device(rng.standard_normal((3, 5)).astype(np.float32))
    assert pn.cross_entropy(z, np.full(3, IGN)) == 0.0
    loss, grad = pn.cross_entropy_and_grad(z, np.full(3, IGN))
    assert loss == 0.0 and is_device(grad) and np.all(grad.copy_to_host() == 0.0)


def test_public_api_on_device_arrays(rng, small_launch, device_api):
    z = hard_logits(rng, 6, 29).reshape(3, 2, 29)
    y = labels_for(rng, z)
    exact = ce64(z, y).ravel()
    d_z, d_y = cuda.to_device(z), cuda.to_device(y)
    rows = pn.cross_entropy(d_z, d_y, reduction="none", backend="cuda")
    assert is_device(rows) and rows.shape == (3, 2)
    assert rel_error(rows.copy_to_host().ravel(), exact) < TOL_FLOAT32
    auto = pn.cross_entropy(d_z, d_y)
    valid = exact[y.ravel() != IGN]
    assert abs(auto - valid.mean()) <= sum_tol(valid) / valid.size
    res = pn.ptx_loss(0.5, d_z, d_y, 0.1, backend="cuda")
    assert res.ce == pytest.approx(auto, rel=1e-12) and res.total == pytest.approx(0.5 + 0.1 * auto)
    lse = pn.logsumexp(d_z, backend="cuda")
    assert lse.shape == (3, 2) and rel_error(lse.copy_to_host(), lse64(z)) < TOL_FLOAT32
    with pytest.raises(TypeError, match="needs host"):
        pn.cross_entropy(d_z, d_y, backend="reference")


@pytest.mark.parametrize("with_out", [False, True])
def test_cross_entropy_and_grad_on_device(rng, small_launch, with_out):
    z = hard_logits(rng, 2 * 4, 35).reshape(2, 4, 35)
    z[np.abs(z) > 1e4] = 0.0  # the gradient check below is absolute
    y = labels_for(rng, z)
    d_z = cuda.to_device(z)
    out = cuda.to_device(np.full(z.shape, np.nan, np.float32)) if with_out else None
    loss, grad = pn.cross_entropy_and_grad(d_z, cuda.to_device(y), out=out)
    assert is_device(grad) and grad.shape == z.shape and grad.dtype == np.float32
    if with_out:
        assert grad is out or grad.device_ctypes_pointer.value == out.device_ctypes_pointer.value
    exact = ce64(z, y).ravel()
    valid = exact[y.ravel() != IGN]
    assert abs(loss - valid.mean()) <= sum_tol(valid) / valid.size
    got = (out if with_out else grad).copy_to_host()
    np.testing.assert_allclose(got, ce_grad64(z, y), rtol=0, atol=2e-6)
    assert np.all(got.reshape(-1, 35)[y.ravel() == IGN] == 0.0)
    np.testing.assert_array_equal(d_z.copy_to_host(), z)
    # the shifted slice: a strided device view in, a gradient of its shape out
    loss_s, grad_s = pn.cross_entropy_and_grad(d_z[:, :-1], cuda.to_device(y)[:, 1:])
    np.testing.assert_allclose(grad_s.copy_to_host(), ce_grad64(z[:, :-1], y[:, 1:]), rtol=0, atol=2e-6)


def test_cross_entropy_and_grad_rejects_a_bad_device_out(rng, small_launch):
    z = cuda.to_device(rng.standard_normal((3, 9)).astype(np.float32))
    y = np.array([1, 2, 3])
    with pytest.raises(ValueError, match="must match the logits"):
        pn.cross_entropy_and_grad(z, y, out=cuda.to_device(np.zeros((3, 8), np.float32)))
    with pytest.raises(ValueError, match="must match the logits"):
        pn.cross_entropy_and_grad(z, y, out=cuda.to_device(np.zeros((3, 9), np.float64)))


def test_token_logprobs_and_entropy_on_device(rng, small_launch):
    z = hard_logits(rng, 7, 41)
    z[np.abs(z) > 1e4] = -1.0
    tokens = labels_for(rng, z)
    d_z = cuda.to_device(z)
    logp, ent = pn.token_logprobs(d_z, cuda.to_device(tokens), temperature=0.7, return_entropy=True)
    assert is_device(logp) and is_device(ent) and logp.shape == (7,) and ent.shape == (7,)
    ls = logp64(z, 0.7)
    valid = tokens != IGN
    want = np.where(valid, ls[np.arange(7), np.where(valid, tokens, 0)], 0.0)
    assert rel_error(logp.copy_to_host(), want) < TOL_FLOAT32
    want_ent = entropy64(z, 0.7)
    assert rel_error(ent.copy_to_host(), np.where(valid, want_ent, 0.0)) < TOL_FLOAT32  # 0 where ignored
    only = pn.entropy(d_z, temperature=0.7)
    assert is_device(only) and rel_error(only.copy_to_host(), want_ent) < TOL_FLOAT32


def test_kl_divergence_and_kl_penalty_on_device(rng, small_launch):
    z = (rng.standard_normal((2, 3, 45)) * 3).astype(np.float32)
    w = (z + rng.standard_normal(z.shape)).astype(np.float32)
    w[0, 1, :5] = -np.inf  # masked reference entries: +inf KL where p > 0 there
    tokens = rng.integers(5, 45, (2, 3))
    tokens[1, 2] = IGN
    d_z, d_w = cuda.to_device(z), cuda.to_device(w)
    lz, lw = logp64(z), logp64(w)
    want_kl = kl64(z, w)
    kl = pn.kl_divergence(d_z, d_w)
    assert is_device(kl) and kl.shape == (2, 3)
    got = kl.copy_to_host()
    assert np.isposinf(got[0, 1]) and np.isposinf(want_kl[0, 1])
    finite = np.isfinite(want_kl)
    assert rel_error(got[finite], want_kl[finite]) < TOL_FLOAT32
    pen = pn.kl_penalty(d_z, d_w, cuda.to_device(tokens), estimator="k3")
    assert is_device(pen) and pen.shape == (2, 3)
    idx = np.where(tokens == IGN, 0, tokens)[..., None]
    r = np.take_along_axis(lz, idx, -1)[..., 0] - np.take_along_axis(lw, idx, -1)[..., 0]
    want = np.where(tokens == IGN, 0.0, np.exp(-r) - 1.0 + r)
    assert rel_error(pen.copy_to_host(), want) < TOL_FLOAT32
    np.testing.assert_array_equal(d_w.copy_to_host(), w)


def test_torch_layer_cuda_chunk_loop_runs_on_the_cuda_backend(rng, small_launch):
    # ptx_numba.torch sends CUDA tensors through its torch-matmul chunk loop; that loop is plain
    # torch plus the public passes, so it runs here on CPU tensors with the cuda backend (the
    # simulator), against torch autograd. The CUDA-tensor views themselves need torch with CUDA.
    torch = pytest.importorskip("torch")
    from ptx_numba.torch import _linear

    h = torch.tensor(rng.standard_normal((5, 6)), dtype=torch.float32)
    weight = torch.tensor(rng.standard_normal((33, 6)) * 0.5, dtype=torch.float32)
    y = torch.tensor([3, -100, 0, 32, 7])
    opts = dict(reduction="mean", backend="cuda", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                softcap=None, chunk_size=2)
    loss, dh, dw, db = _linear._chunked(h, weight, None, y, opts, 1.0)
    h64, w64 = h.double().requires_grad_(), weight.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(h64 @ w64.T, y, ignore_index=-100)
    want.backward()
    assert abs(float(loss) - want.item()) < TOL_FLOAT32 * max(1.0, abs(want.item()))
    np.testing.assert_allclose(dh.numpy(), h64.grad.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dw.numpy(), w64.grad.numpy(), rtol=0, atol=1e-5)
    assert db is None


# ------------------------------------------------------------------------------------------------
# bad device input: the host messages, before any launch
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")

    monkeypatch.setattr(gpu_rowpass, "launch", refuse)
    monkeypatch.setattr(gpu_backward, "launch", refuse)


def host_error(z, y):
    with pytest.raises(ValueError) as info:
        prepare(z, y, ignore_index=IGN)
    return str(info.value)


@pytest.mark.parametrize("bad", [7, -1, -101])
def test_device_label_out_of_range(rng, no_launch, bad):
    z = rng.standard_normal((2, 3, 7)).astype(np.float32)
    y = np.zeros((2, 3), np.int64)
    y[1, 2] = bad
    message = host_error(z, y)
    assert "labels[1, 2]" in message and f"= {bad}" in message and "row 5" in message
    for labels in (y, cuda.to_device(y)):
        with pytest.raises(ValueError) as info:
            pn.cross_entropy(cuda.to_device(z), labels)
        assert str(info.value) == message
        with pytest.raises(ValueError, match="row 5"):
            pn.cross_entropy_and_grad(cuda.to_device(z), labels, reduction="sum")


def test_device_shape_and_dtype_errors(rng, no_launch):
    z = cuda.to_device(rng.standard_normal((4, 6)).astype(np.float32))
    with pytest.raises(ValueError, match="does not match logits shape"):
        pn.cross_entropy(z, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        pn.logsumexp(cuda.to_device(np.zeros(5, np.float32)))
    with pytest.raises(ValueError, match="empty vocabulary"):
        pn.logsumexp(cuda.to_device(np.zeros((3, 0), np.float32)))
    with pytest.raises(TypeError, match="real floats"):
        pn.logsumexp(cuda.to_device(np.zeros((3, 2), np.int32)))
    with pytest.raises(TypeError, match="labels must be integers"):
        pn.cross_entropy(z, cuda.to_device(np.zeros(4, np.bool_)), reduction="sum")
    with pytest.raises(TypeError, match="ignore_index"):
        pn.cross_entropy(z, np.zeros(4, np.int64), ignore_index=1.5)
    with pytest.raises(ValueError, match="reduction"):
        pn.cross_entropy(z, np.zeros(4, np.int64), reduction="max")
    with pytest.raises(TypeError, match="same device"):
        pn.kl_divergence(z, np.zeros((4, 6), np.float32))


# ------------------------------------------------------------------------------------------------
# real GPU only
# ------------------------------------------------------------------------------------------------
@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_shuffle_and_tree_reductions_agree(rng, monkeypatch, dtype):
    z = hard_logits(rng, 300, 5000, dtype)
    y = labels_for(rng, z)
    monkeypatch.setattr(config, "CUDA_USE_SHUFFLE", True)
    shuffled = ce_rows(z, y)
    monkeypatch.setattr(config, "CUDA_USE_SHUFFLE", False)
    tree = ce_rows(z, y)
    tol = TOL_FLOAT64 if dtype == np.float64 else TOL_FLOAT32
    assert rel_error(shuffled, ce64(z, y).ravel()) < tol and rel_error(tree, ce64(z, y).ravel()) < tol


@gpu
@needs_gpu
def test_large_vocab_and_timing_sanity(rng):
    import time

    z = (rng.standard_normal((256, 128256)) * 3).astype(np.float32)
    y = rng.integers(0, z.shape[1], 256)
    d_z, d_y = cuda.to_device(z), cuda.to_device(y)
    assert rel_error(ce_rows(d_z, d_y), ce64(z, y).ravel()) < TOL_FLOAT32
    pn.cross_entropy(d_z, d_y, reduction="sum")  # warm
    start = time.perf_counter()
    for _ in range(5):
        pn.cross_entropy(d_z, d_y, reduction="sum")
    per_call = (time.perf_counter() - start) / 5
    assert per_call < 0.05, f"{per_call * 1e3:.1f} ms for a 131 MB batch"


@gpu
@needs_gpu
def test_torch_cuda_tensors(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    z = hard_logits(rng, 4 * 9, 1000).reshape(4, 9, 1000)
    z[np.abs(z) > 1e4] = 0.5
    y = labels_for(rng, z)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.tensor(z, device="cuda", requires_grad=True).to(dt)
        ty = torch.tensor(y, device="cuda")
        want = ce64(t.detach().float().cpu().numpy()[:, :-1], y[:, 1:]).ravel()
        rows = pn.cross_entropy(t[:, :-1], ty[:, 1:], reduction="none")
        assert rows.shape == (4, 8) and rel_error(rows.copy_to_host().ravel(), want) < TOL_FLOAT32
        ref = torch.nn.functional.cross_entropy(t[:, :-1].float().reshape(-1, 1000), ty[:, 1:].reshape(-1))
        assert pn.cross_entropy(t[:, :-1], ty[:, 1:]) == pytest.approx(ref.item(), rel=1e-5)


@gpu
@needs_gpu
def test_cupy_zero_copy(rng):
    cupy = pytest.importorskip("cupy")
    z = hard_logits(rng, 64, 3000)
    y = labels_for(rng, z)
    rows = pn.cross_entropy(cupy.asarray(z), cupy.asarray(y), reduction="none")
    assert rel_error(cupy.asnumpy(cupy.asarray(rows)), ce64(z, y).ravel()) < TOL_FLOAT32
