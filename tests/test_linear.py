"""Fused linear cross entropy (NumPy API) against float64 ``hidden @ weight.T + bias``, every backend.

The oracle forms the logits in float64 and takes the float64 reference of the loss; gradients are
``G @ W``, ``G.T @ H`` and ``G.sum(0)`` of the float64 logit gradient ``G``. Chunks are made small
(odd sizes, more than one chunk, and a ``d_weight`` slab smaller than V) so the chunk loop, the
reused buffer and the slab accumulation are all exercised; the cuda backend runs on the simulator
with 32 threads per block.
"""
from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import ptx_numba as pn
from ptx_numba import _dispatch, config
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64

from exact import assert_close, ce64, ce_grad64, entropy64, logp64

IGN = -100


@pytest.fixture(params=_dispatch.BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    if _dispatch._load(name) is None:
        pytest.skip(f"{name} backend unavailable: {_dispatch.unavailable_reason(name)}")
    if name == "cuda":
        monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 32)
        monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 2)
    monkeypatch.setattr(config, "LINEAR_SLAB_BYTES", 3 * 8 * 7)  # 3 rows of d_weight per slab at D=7
    return name


def _problem(rng, n=11, d=7, v=37, dtype=np.float32, bias=True):
    h = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((v, d)) * 0.7).astype(dtype)
    b = (rng.standard_normal(v) * 0.3).astype(dtype) if bias else None
    y = rng.integers(0, v, n)
    y[rng.random(n) < 0.25] = IGN
    y[0] = 3
    return h, w, b, y


def _logits64(h, w, b):
    z = np.asarray(h, np.float64).reshape(-1, np.shape(w)[1]) @ np.asarray(w, np.float64).T
    return z + (0.0 if b is None else np.asarray(b, np.float64))


def _tol(dtype):
    return TOL_FLOAT64 if np.dtype(dtype) == np.float64 else TOL_FLOAT32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_loss_and_gradients_match_float64(backend, rng, dtype, reduction, chunk_size):
    h, w, b, y = _problem(rng, dtype=dtype)
    z = _logits64(h, w, b)
    rows = ce64(z, y, IGN)
    count = int((y != IGN).sum())
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / count}[reduction]
    got = pn.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, chunk_size=chunk_size, backend=backend)
    assert_close(got, want, _tol(dtype), "loss")
    g_out = rng.standard_normal(y.shape) if reduction == "none" else 1.7
    loss, dh, dw, db = pn.linear_cross_entropy_and_grad(h, w, y, bias=b, reduction=reduction, grad_output=g_out,
                                                       chunk_size=chunk_size, backend=backend)
    assert_close(loss, want, _tol(dtype), "loss of _and_grad")
    per_row = np.where(y != IGN, g_out, 0.0) / (count if reduction == "mean" else 1)
    g = ce_grad64(z, y, IGN) * count * per_row[:, None]  # d(sum_i g_i ce_i)/dz
    scale = max(1.0, float(np.abs(g).max()))
    for name, got_g, want_g in (("d_hidden", dh, g @ np.asarray(w, np.float64)),
                                ("d_weight", dw, g.T @ np.asarray(h, np.float64)),
                                ("d_bias", db, g.sum(0))):
        assert got_g.dtype == (np.float64 if dtype == np.float64 else np.float32), name
        assert_close(np.asarray(got_g) / scale, want_g / scale, 10 * _tol(dtype), name)


def test_options_match_cross_entropy_on_the_logits(backend, rng):
    """label_smoothing / z_loss / softcap: the same numbers as the row-pass op on the float64 logits."""
    h, w, b, y = _problem(rng, dtype=np.float64)
    z = _logits64(h, w, b)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    want, want_g = pn.cross_entropy_and_grad(z, y, backend="reference", **kw)
    loss, dh, dw, db = pn.linear_cross_entropy_and_grad(h, w, y, bias=b, chunk_size=3, backend=backend, **kw)
    assert_close(loss, want, TOL_FLOAT64, "loss")
    assert_close(dh, want_g @ w, TOL_FLOAT64, "d_hidden")
    assert_close(dw, want_g.T @ h, TOL_FLOAT64, "d_weight")
    assert_close(db, want_g.sum(0), TOL_FLOAT64, "d_bias")


def test_batched_hidden_and_16_bit_inputs(backend, rng):
    h, w, b, y = _problem(rng, n=2 * 5)
    h3, y3 = h.reshape(2, 5, -1), y.reshape(2, 5)
    hb, wb = h3.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16)
    z = _logits64(hb, wb, None)  # the exact product of the bfloat16 values, formed in float32 chunks
    got = pn.linear_cross_entropy(hb, wb, y3, reduction="none", chunk_size=3, backend=backend)
    assert got.shape == (2, 5) and got.dtype == np.float32
    assert_close(got.reshape(-1), ce64(z, y, IGN), TOL_FLOAT32, "bf16 rows")
    _, dh, dw, _ = pn.linear_cross_entropy_and_grad(hb, wb, y3, chunk_size=4, backend=backend)
    assert dh.shape == (2, 5, 7) and dh.dtype == np.float32 and dw.dtype == np.float32  # float32 accumulation
    g = ce_grad64(z, y, IGN)
    assert_close(dw, g.T @ hb.reshape(10, 7).astype(np.float64), 10 * TOL_FLOAT32, "bf16 d_weight")


def test_token_logprobs_and_entropy(backend, rng):
    h, w, b, y = _problem(rng)
    z = _logits64(h, w, b)
    lp, ent = pn.linear_token_logprobs(h, w, y, bias=b, temperature=0.8, return_entropy=True, chunk_size=2,
                                       backend=backend)
    valid = y != IGN
    want_lp = np.where(valid, logp64(z, 0.8)[np.arange(len(y)), np.where(valid, y, 0)], 0.0)
    assert_close(lp, want_lp, TOL_FLOAT32, "logp")
    assert_close(ent, np.where(valid, entropy64(z, 0.8), 0.0), TOL_FLOAT32, "entropy")
    lp_only = pn.linear_token_logprobs(h, w, y, bias=b, temperature=0.8, backend=backend)
    np.testing.assert_array_equal(lp_only, lp)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_without_scipy_goes_through_the_slab(rng, monkeypatch, dtype):
    """Without SciPy's in-place gemm, d_weight accumulates a slab of rows at a time: same numbers."""
    from ptx_numba import linear

    monkeypatch.setattr(config, "LINEAR_SLAB_BYTES", 5 * 7 * np.dtype(dtype).itemsize)  # 5 rows a slab
    h, w, b, y = _problem(rng, dtype=dtype)
    with_blas = pn.linear_cross_entropy_and_grad(h, w, y, bias=b, chunk_size=3)
    monkeypatch.setattr(linear, "_blas_gemm", lambda dt: None)
    slabs = pn.linear_cross_entropy_and_grad(h, w, y, bias=b, chunk_size=3)
    want = ce_grad64(_logits64(h, w, b), y, IGN).T @ np.asarray(h, np.float64)
    for got in (with_blas[2], slabs[2]):
        assert_close(got, want, 10 * _tol(dtype), "d_weight")


def test_all_ignored_gives_zero_loss_and_zero_gradients(rng):
    h, w, b, _ = _problem(rng)
    y = np.full(h.shape[0], IGN)
    loss, dh, dw, db = pn.linear_cross_entropy_and_grad(h, w, y, bias=b)
    assert loss == 0.0 and not dh.any() and not dw.any() and not db.any()


def test_peak_memory_is_a_chunk_not_the_logits(rng, monkeypatch):
    """tracemalloc: beyond the inputs and the gradient outputs, one chunk, one slab and O(N)."""
    n, d, v = 512, 8, 4099
    monkeypatch.setattr(config, "LINEAR_CHUNK_BYTES", 32 * v * 4)  # 32 rows of logits per chunk
    monkeypatch.setattr(config, "LINEAR_SLAB_BYTES", 256 * d * 4)
    h, w, b, y = _problem(rng, n=n, d=d, v=v)
    logits_bytes = n * v * 4
    pn.linear_cross_entropy_and_grad(h, w, y, bias=b, backend="cpu")  # compile outside the trace
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        loss, dh, dw, db = pn.linear_cross_entropy_and_grad(h, w, y, bias=b, backend="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outputs = dh.nbytes + dw.nbytes + db.nbytes
    extra = peak - outputs
    assert extra <= logits_bytes / 8, (extra, logits_bytes)
    assert extra <= 32 * v * 4 + 256 * d * 4 + 200 * n + 2**16


@pytest.mark.parametrize("case, error, match", [
    (dict(weight=np.zeros((3, 4, 7))), ValueError, "weight must be 2-D"),
    (dict(weight=np.zeros((37, 6), np.float32)), ValueError, "does not match weight shape"),
    (dict(bias=np.zeros(36, np.float32)), ValueError, "bias shape"),
    (dict(labels=np.zeros(10, np.int64)), ValueError, "labels"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(hidden=np.zeros((11, 7), np.int32)), TypeError, "hidden must be floating point"),
])
def test_bad_input_is_a_clear_error(rng, case, error, match):
    h, w, b, y = _problem(rng)
    args = dict(hidden=h, weight=w, labels=y, bias=b, chunk_size=None)
    args.update(case)
    with pytest.raises(error, match=match):
        pn.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], bias=args["bias"],
                                chunk_size=args["chunk_size"])
