"""The ``cuda`` backend's gradient pass against the float64 reference, on the CUDA simulator."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from ptx_numba import config, gpu  # noqa: E402
from ptx_numba._rowpass import GradCoef, StatsSpec  # noqa: E402
from ptx_numba._validate import decode_to_float64  # noqa: E402
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64  # noqa: E402
from ptx_numba.reference import backward as ref_backward  # noqa: E402
from ptx_numba.reference import rowpass as ref  # noqa: E402

if not gpu.is_available()[0]:
    pytest.skip("cuda backend unavailable", allow_module_level=True)

from numba import cuda  # noqa: E402

from test_gpu_rowpass import encode, hard_rows, labels  # noqa: E402

#: Relative tolerance per output encoding: the float32 formula, then one rounding to the output:
#: the contract's for float32 and float64, one ulp of float16 (int16) and bfloat16 (uint16) beyond.
OUT_TOL = {np.float32: TOL_FLOAT32, np.float64: TOL_FLOAT64, np.int16: 2.0**-10, np.uint16: 2.0**-7}


@pytest.fixture
def small_launch(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 2)


def coefficients(rng, n, b, e):
    coef = GradCoef(A=rng.standard_normal(n), B=rng.standard_normal(n) if b else None, C=-np.ones(n),
                    D=rng.standard_normal(n) * 1e-3, E=rng.standard_normal(n) if e else None)
    zero = np.arange(n) % 4 == 1  # ignored rows: every coefficient 0
    return GradCoef(*(None if c is None else np.where(zero, 0.0, c) for c in coef)), zero


def check(got, want, tol):
    g, w = decode_to_float64(got), decode_to_float64(want)
    assert np.array_equal(np.isnan(g), np.isnan(w))
    fin = np.isfinite(w)
    assert np.array_equal(g[~fin & ~np.isnan(w)], w[~fin & ~np.isnan(w)])
    err = np.abs(g[fin] - w[fin]) / np.maximum(np.abs(w[fin]), 1e-30 + (tol < 1e-9) * 1.0)
    # or, for entries far below 1, the float32 contract relative to max(1, |w|)
    ok = (err <= tol) | (np.abs(g[fin] - w[fin]) <= TOL_FLOAT32 * np.maximum(1.0, np.abs(w[fin])))
    assert np.all(ok), float(np.max(np.abs(g[fin] - w[fin])))


SPECS = [(StatsSpec(), False, False), (StatsSpec(inv_temperature=0.7, pair=True), True, True),
         (StatsSpec(softcap=5.0, inv_temperature=1.3), True, False),
         (StatsSpec(softcap=4.0, pair=True), True, True)]


@pytest.mark.parametrize("enc", ["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("spec,b,e", SPECS, ids=str)
def test_against_reference(rng, small_launch, enc, spec, b, e):
    n, v = 9, 37
    x = hard_rows(rng, n, v, enc)
    w = hard_rows(rng, n, v, enc)[::-1].copy()
    y = labels(rng, n, v)
    stats = ref.row_stats(x, y, spec, w if spec.pair else None)
    coef, zero = coefficients(rng, n, b, e)
    for out_dtype in (np.float32, np.float64, np.int16, np.uint16):
        got = np.full((n, v), 7, out_dtype)
        want = np.zeros((n, v), out_dtype)
        gpu.BACKEND.row_grad(x, y, spec, stats, coef, got, w if e else None)
        ref_backward.row_grad(x, y, spec, stats, coef, want, w if e else None)
        check(got, want, OUT_TOL[out_dtype])
        assert np.all(decode_to_float64(got)[zero] == 0.0)


def test_label_entry_survives_16bit_rounding(small_launch):
    # p_y within an ulp of 1: p_y - 1 must be formed before rounding (Liger-Kernel #1329).
    z = np.full((2, 40), -13.0)  # p_y = 1 - 8.8e-5: 1.0 in bfloat16, not in float32
    z[:, 3] = 0.0
    y = np.array([3, 3])
    stats = ref.row_stats(z.astype(np.float32), y, StatsSpec())
    coef = GradCoef(A=np.ones(2), C=-np.ones(2))
    exact = np.exp(-13.0) * 39 / (1 + 39 * np.exp(-13.0))  # -(p_y - 1)
    for enc, out_dtype in (("bf16", np.uint16), ("f16", np.int16), ("f32", np.float32)):
        x = encode(z, enc)
        out = np.zeros((2, 40), out_dtype)
        gpu.BACKEND.row_grad(x, y, StatsSpec(), stats, coef, out)
        g = decode_to_float64(out)[:, 3]
        assert np.all(g < 0) and np.all(np.abs(g + exact) <= 0.01 * exact), (enc, g, -exact)


@pytest.mark.parametrize("enc", ["f32", "f16"])
def test_device_3d_in_place(rng, small_launch, enc):
    z = hard_rows(rng, 2 * 4, 29, enc).reshape(2, 4, 29)
    spec = StatsSpec(inv_temperature=0.5)
    host = z.reshape(-1, 29)
    y = labels(rng, 8, 29)
    stats = ref.row_stats(host, y, spec)
    coef, _ = coefficients(rng, 8, True, False)
    want = np.zeros_like(host)
    ref_backward.row_grad(host, y, spec, stats, coef, want)
    d = cuda.to_device(z.view(np.float16) if enc == "f16" else z)
    gpu.BACKEND.row_grad(d, y, spec, stats, coef, d)  # out aliases x: an in-place backward
    got = d.copy_to_host()
    got = got.view(np.int16) if enc == "f16" else got
    check(got.reshape(-1, 29), want, OUT_TOL[np.int16 if enc == "f16" else np.float32])
