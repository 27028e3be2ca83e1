"""``ptx_numba.dask`` on the threads scheduler and on a real ``distributed.LocalCluster`` (2 worker
processes), against the single-process API and an independent float64 NumPy computation."""
import json
import os

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import ptx_numba as pn  # noqa: E402
import ptx_numba.dask as pnd  # noqa: E402
from exact import ce64  # noqa: E402
from ptx_numba.contract import TOL_FLOAT32, tolerance  # noqa: E402
from test_cli import expected_loss, run_json  # noqa: E402
from test_cli_shards import make_shards  # noqa: E402

COMBINE_RTOL = 1e-12  # the same kernels per block: only the float64 combine order differs
# On the cluster the backend is named: under "auto" each worker would first import numba.cuda to
# look for a GPU (seconds per worker process), which the test does not need to pay for.
HOST = "cpu" if "cpu" in pn.available_backends() else "reference"


def batch(rng, shape=(41, 3), vocab=67, dtype=np.float32):
    x = rng.standard_normal(shape + (vocab,)) * 3
    rows = x.reshape(-1, vocab)
    rows[0] += 3e4  # a large offset row
    rows[1, : vocab // 2] = -np.inf  # masked vocabulary
    y = rng.integers(vocab // 2, vocab, size=shape)
    y.reshape(-1)[2] = -100
    return x.astype(dtype), y


@pytest.fixture(params=["threads", "sync"])
def scheduler(request):
    with dask.config.set(scheduler=request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reductions_equal_single_process(rng, scheduler, dtype):
    x, y = batch(rng, dtype=dtype)
    dx = da.from_array(x, chunks=(7, 2, 20))  # V split on purpose: rechunked to one chunk
    dy = da.from_array(y, chunks=(11, 1))  # labels chunked differently: rechunked to the rows of x
    for reduction in ("mean", "sum"):
        got = float(pnd.cross_entropy(dx, dy, reduction=reduction).compute())
        want = pn.cross_entropy(x, y, reduction=reduction)
        assert abs(got - want) <= COMBINE_RTOL * max(1.0, abs(want)), reduction
    exact = ce64(x, y)
    tol = tolerance(np.dtype(dtype).name)
    got_mean = float(pnd.cross_entropy(dx, dy).compute())
    assert abs(got_mean - exact[y != -100].mean()) <= tol * max(1.0, abs(exact[y != -100].mean()))
    rows = pnd.cross_entropy(dx, dy, reduction="none").compute()
    assert rows.shape == y.shape and rows.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_array_equal(rows, pn.cross_entropy(x, y, reduction="none"))
    assert np.all(np.abs(rows - exact) <= tol * np.maximum(1.0, np.abs(exact)))


def test_ptx_loss_and_dask_compute(rng, scheduler):
    x, y = batch(rng, shape=(29,), vocab=33)
    dx = da.from_array(x, chunks=(4, 33))
    lazy = pnd.ptx_loss(0.25, dx, y, 0.1)
    (got,) = dask.compute(lazy)
    want = pn.ptx_loss(0.25, x, y, 0.1)
    assert isinstance(got, pn.PTXLoss)
    for g, w in zip(got, want):
        assert abs(g - w) <= COMBINE_RTOL * max(1.0, abs(w))


def test_all_ignored_and_empty_give_zero(rng, scheduler):
    x = da.from_array(rng.standard_normal((9, 5)).astype(np.float32), chunks=(2, 5))
    assert float(pnd.cross_entropy(x, np.full(9, -100)).compute()) == 0.0
    assert float(pnd.cross_entropy(da.zeros((0, 5), chunks=(1, 5)), np.zeros(0, int)).compute()) == 0.0
    assert pnd.ptx_loss(1.5, x, np.full(9, -100), 2.0).compute() == (1.5, 0.0, 0.0)


def test_inputs_are_not_modified_and_numpy_inputs_work(rng):
    x, y = batch(rng, shape=(8,), vocab=9)
    x0, y0 = x.copy(), y.copy()
    got = float(pnd.cross_entropy(x, y, reduction="sum").compute(scheduler="sync"))
    assert abs(got - pn.cross_entropy(x, y, reduction="sum")) <= COMBINE_RTOL * max(1.0, abs(got))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("call, exc, fragment", [
    (lambda x, y: pnd.cross_entropy(x, y[:-1]), ValueError, "labels shape"),
    (lambda x, y: pnd.cross_entropy(x, y, reduction="avg"), ValueError, "reduction"),
    (lambda x, y: pnd.cross_entropy(x[0], y[0]), ValueError, "at least 2 dimensions"),
    (lambda x, y: pnd.ptx_loss(float("nan"), x, y, 0.1), ValueError, "rl_loss"),
    (lambda x, y: pnd.cross_entropy(x, None), TypeError, "labels is None"),
])
def test_bad_input(rng, call, exc, fragment):
    x = da.from_array(rng.standard_normal((6, 4)).astype(np.float32), chunks=(2, 4))
    y = np.zeros(6, int)
    with pytest.raises(exc, match=fragment):
        call(x, y)


def test_token_logprobs_and_kl_penalty(rng, scheduler):
    if not hasattr(pn, "token_logprobs") or not hasattr(pn, "kl_penalty"):
        pytest.skip("ptx_numba.token_logprobs / kl_penalty not in this version")
    x, t = batch(rng, shape=(19, 2), vocab=31)
    t[t < 0] = 0
    ref = (x + rng.standard_normal(x.shape).astype(np.float32)).astype(np.float32)
    ref[np.isinf(x)] = -np.inf
    dx, dref = da.from_array(x, chunks=(5, 1, 31)), da.from_array(ref, chunks=(3, 2, 10))
    lp = pnd.token_logprobs(dx, t).compute()
    np.testing.assert_array_equal(lp, pn.token_logprobs(x, t))
    lp2, ent = dask.compute(*pnd.token_logprobs(dx, t, return_entropy=True))
    want_lp, want_ent = pn.token_logprobs(x, t, return_entropy=True)
    np.testing.assert_array_equal(lp2, want_lp)
    np.testing.assert_array_equal(ent, want_ent)
    for est in ("k1", "k3"):
        np.testing.assert_array_equal(pnd.kl_penalty(dx, dref, t, estimator=est).compute(),
                                      pn.kl_penalty(x, ref, t, estimator=est))


def test_linear_cross_entropy(rng, scheduler):
    if not hasattr(pn, "linear_cross_entropy"):
        pytest.skip("ptx_numba.linear_cross_entropy not in this version")
    h = rng.standard_normal((23, 16)).astype(np.float32)
    w = rng.standard_normal((37, 16)).astype(np.float32)
    y = rng.integers(0, 37, size=23)
    y[5] = -100
    dh = da.from_array(h, chunks=(6, 8))
    got = float(pnd.linear_cross_entropy(dh, w, y).compute())
    want = pn.linear_cross_entropy(h, w, y)
    assert abs(got - want) <= COMBINE_RTOL * max(1.0, abs(want))
    np.testing.assert_array_equal(pnd.linear_cross_entropy(dh, w, y, reduction="none").compute(),
                                  pn.linear_cross_entropy(h, w, y, reduction="none"))


# --------------------------------------------------------------------------------------------
# a real LocalCluster: two worker processes
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=":0", env={"NUMBA_NUM_THREADS": "1"})
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_local_cluster_equals_single_process(rng, client):
    x, y = batch(rng, shape=(53,), vocab=101)
    dx = da.from_array(x, chunks=(8, 101))
    mean, total, rows, ptx = dask.compute(
        pnd.cross_entropy(dx, y, backend=HOST), pnd.cross_entropy(dx, y, reduction="sum", backend=HOST),
        pnd.cross_entropy(dx, y, reduction="none", backend=HOST), pnd.ptx_loss(1.0, dx, y, 0.5, backend=HOST))
    assert abs(float(mean) - pn.cross_entropy(x, y)) <= COMBINE_RTOL * max(1.0, abs(float(mean)))
    assert abs(float(total) - pn.cross_entropy(x, y, reduction="sum")) <= COMBINE_RTOL * abs(float(total))
    np.testing.assert_array_equal(rows, pn.cross_entropy(x, y, reduction="none"))
    assert abs(ptx.total - pn.ptx_loss(1.0, x, y, 0.5).total) <= COMBINE_RTOL * abs(ptx.total)
    # the blocks really ran on both worker processes
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2


def test_cli_on_the_cluster_equals_single_process(capsys, rng, tmp_path, client):
    d = str(tmp_path / "shards")
    logits, labels = make_shards(rng, d, sizes=(13, 4, 9, 11, 2), vocab=29)
    ckpt = str(tmp_path / "c.ckpt")
    local = run_json(capsys, "score", d, "--beta", "0.5")
    remote = run_json(capsys, "score", d, "--beta", "0.5", "--scheduler", client.scheduler.address,
                      "--checkpoint", ckpt, "--per-row", str(tmp_path / "rows.npy"))
    assert remote["backend"] == local["backend"] and remote["shards_scored"] == 5
    assert abs(remote["ce"] - local["ce"]) <= TOL_FLOAT32 * max(1.0, abs(local["ce"]))  # per-row sums: float32 rows
    assert abs(remote["ce"] - expected_loss(logits, labels, 0.5, 0.0)[2]) <= TOL_FLOAT32 * max(1.0, local["ce"])
    np.testing.assert_allclose(np.load(tmp_path / "rows.npy"), ce64(logits, labels), rtol=TOL_FLOAT32, atol=TOL_FLOAT32)
    with open(ckpt, encoding="utf-8") as f:
        assert len(json.load(f)["shards"]) == 5
    again = run_json(capsys, "score", d, "--beta", "0.5", "--scheduler", client.scheduler.address,
                     "--checkpoint", ckpt, "--per-row", str(tmp_path / "rows.npy"))
    assert again["shards_scored"] == 0 and again["ce"] == remote["ce"]


@pytest.mark.slow
def test_cli_workers_starts_and_stops_its_own_cluster(capsys, rng, tmp_path):
    pytest.importorskip("distributed")
    d = str(tmp_path / "w")
    logits, labels = make_shards(rng, d, sizes=(6, 5, 7), vocab=19)
    result = run_json(capsys, "score", d, "--workers", "1", "--backend", HOST)
    assert result["shards_scored"] == 3 and result["backend"] == HOST
    assert abs(result["ce"] - expected_loss(logits, labels, 1, 0)[2]) <= TOL_FLOAT32 * max(1.0, abs(result["ce"]))


# --------------------------------------------------------------------------------------------
# The graph plumbing of the wrappers for functions documented but possibly not yet in the core,
# exercised with stand-ins that follow the documented signatures (in-process schedulers only).
# --------------------------------------------------------------------------------------------
def _fake_token_logprobs(logits, tokens, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                         backend="auto"):
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=-1, keepdims=True)
    logp_all = z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))
    t = np.asarray(tokens)
    valid = t != ignore_index
    lp = np.where(valid, np.take_along_axis(logp_all, np.where(valid, t, 0)[..., None], -1)[..., 0], 0.0)
    dtype = np.float64 if np.asarray(logits).dtype == np.float64 else np.float32
    if return_entropy:
        p = np.exp(logp_all)
        terms = np.where(p > 0, p * np.where(p > 0, logp_all, 0.0), 0.0)  # 0 * log 0 = 0 at -inf logits
        return lp.astype(dtype), (-terms.sum(axis=-1)).astype(dtype)
    return lp.astype(dtype)


def _fake_kl_penalty(logits, ref_logits, tokens, *, estimator="k1", temperature=1.0, ignore_index=-100,
                     backend="auto"):
    r = (_fake_token_logprobs(logits, tokens, temperature=temperature, ignore_index=ignore_index)
         - _fake_token_logprobs(ref_logits, tokens, temperature=temperature, ignore_index=ignore_index))
    return r if estimator == "k1" else np.exp(-r) - 1 + r


def _fake_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, backend="auto"):
    logits = np.asarray(hidden) @ np.asarray(weight).T  # float32 stays float32, as documented
    if bias is not None:
        logits = logits + bias
    return pn.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction, backend=backend)


@pytest.fixture
def stand_ins(monkeypatch):
    for name, fn in (("token_logprobs", _fake_token_logprobs), ("kl_penalty", _fake_kl_penalty),
                     ("linear_cross_entropy", _fake_linear_cross_entropy)):
        if not hasattr(pn, name):
            monkeypatch.setattr(pn, name, fn, raising=False)
    return pn


def test_wrapper_plumbing_with_documented_signatures(rng, scheduler, stand_ins):
    x, t = batch(rng, shape=(13, 2), vocab=29)
    t[t < 0] = 0
    ref = x + rng.standard_normal(x.shape).astype(np.float32)
    dx, dref = da.from_array(x, chunks=(4, 1, 10)), da.from_array(ref, chunks=(5, 2, 29))
    dt = da.from_array(t, chunks=(3, 2))
    np.testing.assert_array_equal(pnd.token_logprobs(dx, dt).compute(), pn.token_logprobs(x, t))
    lp, ent = dask.compute(*pnd.token_logprobs(dx, dt, return_entropy=True, temperature=0.7))
    want_lp, want_ent = pn.token_logprobs(x, t, return_entropy=True, temperature=0.7)
    np.testing.assert_array_equal(lp, want_lp)
    np.testing.assert_array_equal(ent, want_ent)
    np.testing.assert_array_equal(pnd.kl_penalty(dx, dref, dt, estimator="k3").compute(),
                                  pn.kl_penalty(x, ref, t, estimator="k3"))
    h = rng.standard_normal((17, 8)).astype(np.float32)
    w = rng.standard_normal((11, 8)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    y = rng.integers(0, 11, size=17)
    y[4] = -100
    dh = da.from_array(h, chunks=(5, 4))
    for bias in (None, b):
        got = float(pnd.linear_cross_entropy(dh, w, y, bias=bias).compute())
        want = pn.linear_cross_entropy(h, w, y, bias=bias)
        assert abs(got - want) <= COMBINE_RTOL * max(1.0, abs(want))
        np.testing.assert_array_equal(pnd.linear_cross_entropy(dh, w, y, bias=bias, reduction="none").compute(),
                                      pn.linear_cross_entropy(h, w, y, bias=bias, reduction="none"))
    assert float(pnd.linear_cross_entropy(dh, w, np.full(17, -100)).compute()) == 0.0


def test_wrappers_say_when_the_core_function_is_missing(monkeypatch):
    monkeypatch.delattr(pn, "token_logprobs", raising=False)
    with pytest.raises(NotImplementedError, match="needs ptx_numba.token_logprobs"):
        pnd.token_logprobs(np.zeros((2, 3), np.float32), np.zeros(2, int))
