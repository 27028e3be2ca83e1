"""The compile tests cover what the public ops launch: every kernel key a public op asks the cuda
backend for (on the simulator, over every op, option and encoding) is listed in
:mod:`ptx_numba.gpu.kernels.variants`, the list ``tests/gpu_sass_compile.py`` compiles."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

import ptx_numba as pn  # noqa: E402
from ptx_numba import config, gpu  # noqa: E402

if not gpu.is_available()[0]:
    pytest.skip(f"cuda backend unavailable: {gpu.is_available()[1]}", allow_module_level=True)

from ptx_numba.gpu.kernels import grad as kgrad  # noqa: E402
from ptx_numba.gpu.kernels import stats as kstats  # noqa: E402
from ptx_numba.gpu.kernels import variants  # noqa: E402


@pytest.fixture
def launched(monkeypatch):
    """Record the keys the backend compiles (32 threads and 2 blocks to keep the simulator quick)."""
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 2)
    seen = {"stats": set(), "grad": set()}
    real_stats, real_grad = kstats.get_stats_kernel, kgrad.get_grad_kernel

    def stats(key):
        seen["stats"].add(key)
        return real_stats(key)

    def grad(key):
        seen["grad"].add(key)
        return real_grad(key)

    monkeypatch.setattr(kstats, "get_stats_kernel", stats)
    monkeypatch.setattr(kgrad, "get_grad_kernel", grad)
    return seen


def _as_listed(key):
    # The simulator forces the tree reduction; the list is for the default 256 threads.
    return key._replace(tpb=256, **({"use_shuffle": True} if hasattr(key, "use_shuffle") else {}))


def _encodings():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)


def test_every_key_the_public_ops_launch_is_compiled_by_the_sass_tests(rng, launched):
    torch = pytest.importorskip("torch")
    import ptx_numba.torch as pnt

    B = "cuda"
    for dt in _encodings():
        z = (rng.standard_normal((3, 9)) * 2).astype(dt)
        w = (rng.standard_normal((3, 9)) * 2).astype(_encodings()[(_encodings().index(dt) + 1) % 4])
        y = np.array([1, -100, 8])
        pn.logsumexp(z, backend=B)
        for opts in ({}, {"softcap": 5.0}, {"label_smoothing": 0.1}, {"label_smoothing": 0.1, "softcap": 5.0},
                     {"z_loss": 1e-3}):
            pn.cross_entropy(z, y, backend=B, **opts)
            pn.cross_entropy_and_grad(z, y, backend=B, **opts)
        for t in (1.0, 0.7):
            pn.token_logprobs(z, y, temperature=t, return_entropy=True, backend=B)
            pn.token_logprobs(z, y, temperature=t, backend=B)
            pn.entropy(z, temperature=t, backend=B)
            pn.kl_divergence(z, w, temperature=t, backend=B)
            for est in variants_estimators():
                pn.kl_penalty(z, w, y, estimator=est, temperature=t, backend=B)
    # gradients of the log-prob family and the fused linear path go through the torch layer / linear
    for t in (1.0, 0.7):
        zt = torch.tensor(rng.standard_normal((3, 9)), dtype=torch.float32, requires_grad=True)
        wt = torch.tensor(rng.standard_normal((3, 9)), dtype=torch.float32)
        yt = torch.tensor([1, -100, 8])
        lp, ent = pnt.token_logprobs(zt, yt, temperature=t, return_entropy=True, backend=B)
        (lp.sum() + ent.sum()).backward()
        pnt.token_logprobs(zt, yt, temperature=t, backend=B).sum().backward()
        pnt.entropy(zt, temperature=t, backend=B).sum().backward()
        pnt.kl_divergence(zt, wt, temperature=t, backend=B).sum().backward()
        for est in ("k3", "full"):
            pnt.kl_penalty(zt, wt, yt, estimator=est, temperature=t, backend=B).sum().backward()
        h = rng.standard_normal((4, 5)).astype(np.float32)
        head = rng.standard_normal((9, 5)).astype(np.float32)
        pn.linear_token_logprobs(h, head, np.array([0, 3, -100, 8]), temperature=t, return_entropy=True,
                                 backend=B)
    pn.linear_cross_entropy_and_grad(h, head, np.array([0, 3, -100, 8]), label_smoothing=0.1, backend=B)

    listed_stats = set(variants.stats_keys())
    listed_grad = set(variants.grad_keys())
    stats = {_as_listed(k) for k in launched["stats"]}
    grads = {_as_listed(k) for k in launched["grad"]}
    assert stats - listed_stats == set()
    assert grads - listed_grad == set()
    # and the ops did reach every moment set, coefficient set and encoding of the list
    assert {(k.entropy, k.dsum, k.pair) for k in stats} == set(variants.STATS_MOMENTS)
    assert {(k.has_b, k.has_e) for k in grads} == set(variants.GRAD_TERMS)
    assert {k.encoding for k in stats} == {"f32", "f64", "f16", "bf16"}
    assert {k.w_encoding for k in stats if k.pair} == {"f32", "f64", "f16", "bf16"}


def variants_estimators():
    from ptx_numba.logprobs import ESTIMATORS

    return ESTIMATORS


def test_the_list_has_no_duplicates_and_the_default_set_is_a_subset():
    full = variants.stats_keys()
    assert len(full) == len(set(full))
    assert set(variants.stats_keys(reductions=(True,), mixed=False)) <= set(full)
    assert set(variants.grad_keys(mixed=False)) <= set(variants.grad_keys())
    assert all(k.compensate == (k.encoding != "f64") for k in full)
