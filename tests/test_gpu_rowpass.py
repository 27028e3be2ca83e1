"""The ``cuda`` backend's row statistics against the float64 reference, on the CUDA simulator.

The simulator runs one Python thread per GPU thread, so shapes stay tiny and ``small_launch``
shrinks the block to 32 threads and the grid to 2 blocks: rows cross blocks, partial 4-element
steps and the grid-stride loop over rows.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from ptx_numba import config  # noqa: E402
from ptx_numba import gpu  # noqa: E402
from ptx_numba._rowpass import Backend, StatsSpec  # noqa: E402
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64, rel_error  # noqa: E402
from ptx_numba.reference import rowpass as ref  # noqa: E402

_ok, _why = gpu.is_available()
if not _ok:
    pytest.skip(f"cuda backend unavailable: {_why}", allow_module_level=True)

from numba import cuda  # noqa: E402

from ptx_numba.gpu import rowpass  # noqa: E402
from ptx_numba.gpu.kernels import on_simulator  # noqa: E402

ON_SIM = on_simulator()

#: The contract's tolerance per encoding (float64 only for float64 logits).
TOL = {"f32": TOL_FLOAT32, "f64": TOL_FLOAT64, "f16": TOL_FLOAT32, "bf16": TOL_FLOAT32}
ENC_DTYPE = {"f32": np.float32, "f64": np.float64, "f16": np.int16, "bf16": np.uint16}


@pytest.fixture
def small_launch(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 2)


def encode(z64: np.ndarray, enc: str) -> np.ndarray:
    if enc == "f32":
        return z64.astype(np.float32)
    if enc == "f64":
        return z64.copy()
    if enc == "f16":
        with np.errstate(over="ignore"):
            return z64.astype(np.float16).view(np.int16)
    bits = z64.astype(np.float32).view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(z64)
    out[nan] = 0x7FC0
    return out


def hard_rows(rng, n, v, enc):
    """Adversarial rows: offsets, spikes, constants, masks, NaN among -inf, +inf, all -inf."""
    z = rng.standard_normal((n, v)) * 4
    big = 3e4 if enc in ("f32", "f64", "bf16") else 3e3  # float16 tops out at 65504
    kinds = ["plain", "plus", "minus", "spike", "const", "masked", "nan_in_ninf", "pinf", "all_ninf", "one"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "plus":
            z[i] += big
        elif kind == "minus":
            z[i] -= big
        elif kind == "spike":
            z[i, rng.integers(v)] += 40.0
        elif kind == "const":
            z[i] = 7.25
        elif kind == "masked":
            mask = rng.random(v) < 0.7
            mask[rng.integers(v)] = False
            z[i, mask] = -np.inf
        elif kind == "nan_in_ninf":  # issue 14 item 1: NaN while the shift is still -inf
            z[i, : v // 2] = -np.inf
            z[i, rng.integers(v // 2)] = np.nan
        elif kind == "pinf":
            z[i, rng.integers(v)] = np.inf
        elif kind == "all_ninf":
            z[i] = -np.inf
        elif kind == "one":
            z[i] = -np.inf
            z[i, rng.integers(v)] = 1.5
    return encode(z, enc)


def check_stats(got, want, tol):
    assert got._fields == want._fields
    for name, g, w in zip(got._fields, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g is not None and g.dtype == np.float64 and g.shape == w.shape, name
        # NaN and infinities must match exactly: rel_error counts any other pairing as inf
        err = rel_error(g, w)
        assert err <= tol, (name, err, g, w)


def labels(rng, n, v):
    y = rng.integers(0, v, n)
    y[::3] = -1
    return y


SPECS = [
    StatsSpec(inv_temperature=it, softcap=cap, target=t, entropy=e, dsum=d, pair=p)
    for (it, cap), t, e, d, p in itertools.product(
        [(1.0, 0.0), (0.7, 0.0), (1.3, 5.0)], [False, True], [False, True], [False, True], [False, True])
]


def test_backend_object():
    assert isinstance(gpu.BACKEND, Backend)
    assert gpu.BACKEND.name == "cuda" and gpu.BACKEND.is_available() == (True, "")
    assert not gpu.BACKEND.prefers_host_input(1 << 40)  # simulator
    host = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(gpu.BACKEND.to_device(host).copy_to_host(), host)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_spec_float32(rng, small_launch, spec):
    x = hard_rows(rng, 10, 37, "f32")
    w = hard_rows(rng, 10, 37, "f32")[::-1].copy()
    y = labels(rng, 10, 37)
    check_stats(gpu.BACKEND.row_stats(x, y, spec, w if spec.pair else None),
                ref.row_stats(x, y, spec, w if spec.pair else None), TOL["f32"])


@pytest.mark.parametrize("enc", ["f64", "f16", "bf16"])
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[-1], SPECS[23], SPECS[31]], ids=str)
def test_encodings(rng, small_launch, enc, spec):
    x = hard_rows(rng, 10, 45, enc)
    w = hard_rows(rng, 10, 45, "f32" if enc == "f64" else enc)  # the two sets may differ
    y = labels(rng, 10, 45)
    check_stats(rowpass.row_stats(x, y, spec, w if spec.pair else None),
                ref.row_stats(x, y, spec, w if spec.pair else None), TOL[enc])


@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 129), (3, 300)])
def test_shapes(rng, small_launch, shape):
    spec = StatsSpec(target=True, entropy=True, dsum=True)
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    y = rng.integers(0, shape[1], shape[0])
    check_stats(rowpass.row_stats(x, y, spec), ref.row_stats(x, y, spec), TOL["f32"])


def test_empty_block(small_launch):
    spec = StatsSpec(target=True, pair=True)
    got = rowpass.row_stats(np.zeros((0, 5), np.float32), np.zeros(0, np.int64), spec,
                            np.zeros((0, 5), np.float32))
    assert got.m.shape == (0,) and got.u.shape == (0,) and got.t is None


def test_host_rows_strided_apart(rng, small_launch):
    base = hard_rows(rng, 6, 40, "f32")
    x = base[:, :-3]  # unit stride along V, rows 40 apart
    y = labels(rng, 6, 37)
    spec = StatsSpec(target=True, entropy=True)
    check_stats(rowpass.row_stats(x, y, spec), ref.row_stats(np.ascontiguousarray(x), y, spec), TOL["f32"])


@pytest.mark.parametrize("enc", ["f32", "f16"])
def test_device_3d_strided_in_place(rng, small_launch, enc):
    z = hard_rows(rng, 2 * 5, 33, enc).reshape(2, 5, 33)
    wz = hard_rows(rng, 2 * 5, 33, enc).reshape(2, 5, 33)
    dz = cuda.to_device(z.view(np.float16) if enc == "f16" else z)
    dw = cuda.to_device(wz.view(np.float16) if enc == "f16" else wz)
    spec = StatsSpec(inv_temperature=0.5, target=True, entropy=True, dsum=True, pair=True)
    for sl in (np.s_[:, :-1], np.s_[:, ::2], np.s_[::-1, 1:]):
        host = np.ascontiguousarray(z[sl]).reshape(-1, 33)
        host_w = np.ascontiguousarray(wz[sl]).reshape(-1, 33)
        y = labels(rng, host.shape[0], 33)
        check_stats(rowpass.row_stats(dz[sl], y, spec, dw[sl]), ref.row_stats(host, y, spec, host_w), TOL[enc])


def adversarial_row(v):
    """Issue 14 item 10: one dominant entry and v - 1 entries just below half an ulp of it."""
    t = 1.49 * 2.0**-23 / 4
    x = np.full((1, v), np.log(t), np.float32)
    x[0, 0] = 0.0
    return x


def test_compensated_sum_keeps_the_contract_on_the_adversarial_row(small_launch):
    # 2**16 entries over 32 threads put 2048 terms in each thread's sum, as 2**20 entries over
    # 256 threads put 4096 in the default launch: enough for the plain float32 sum to lose the
    # small terms next to the dominant one (the failure of issue 14), not for the compensated sum.
    x = adversarial_row(2**16)
    y = np.zeros(1, np.int64)
    spec = StatsSpec(target=True)
    want = ref.row_stats(x, y, spec)
    exact_ce = np.log(want.s) - (want.target - want.m)

    def ce(compensate):
        host = rowpass.stats_on_device(x, y, spec, compensate=compensate).copy_to_host()
        return np.log(host[1]) - (host[2] - host[0])

    assert abs(ce(False) - exact_ce)[0] > TOL_FLOAT32  # the failure mode is real at this size
    assert abs(ce(True) - exact_ce)[0] < 2e-6  # deliberately 10x inside the contract


@pytest.mark.parametrize("compensate", [False, True])
def test_one_thread_sum_of_the_adversarial_row(compensate):
    """Issue 14 item 10 on the simulator: the sum of one GPU thread, the place the terms are lost.

    One thread of a 32-thread block scans the row of 2**16 entries as it does inside the kernel
    (its stride, its four-entry steps): 2048 terms next to the dominant one, like each thread's
    4096 at V = 2**20 in the default launch. The plain float32 sum breaks the contract there; the
    compensated one holds it with room to spare. (The test above runs the whole kernel on this
    row; this one isolates the thread.)
    """
    from ptx_numba.gpu.kernels.stats import StatsKey, make_scan

    v, tpb = 2**16, 32
    x = adversarial_row(v)
    key = StatsKey("f32", "", "plain", False, False, False, tpb, False, compensate)
    scan = make_scan(key)
    one = np.float32(1.0)

    @cuda.jit
    def one_thread(x3, out):
        r = scan(x3, x3, 0, 0, 0, one, one, one)
        out[0] = r[0]
        out[1] = r[1]

    out = cuda.to_device(np.zeros(2, np.float32))
    one_thread[1, 1](cuda.to_device(x.reshape(1, 1, v)), out)
    m, s = out.copy_to_host().astype(np.float64)
    mine = np.arange(v) % (4 * tpb) % tpb == 0  # thread 0's entries: j, j+32, j+64, j+96, ...
    exact = np.exp(x[0, mine].astype(np.float64) - m).sum()
    assert m == 0.0 and mine.sum() == v // tpb
    err = abs(s - exact) / exact  # = the CE error it causes: this thread holds nearly all the mass
    if compensate:
        assert err < TOL_FLOAT32 / 10
    else:
        assert err > TOL_FLOAT32  # the failure of issue 14, reproduced in one thread


def test_slowly_rising_row(small_launch):
    # Every step raises the maximum a little: the lazy shift keeps the rescaling error from
    # piling up (each rescale would otherwise round s once more).
    x = (np.arange(4096, dtype=np.float64) * 1e-3).astype(np.float32)[None, :]
    spec = StatsSpec(target=True, entropy=True, dsum=True)
    y = np.array([17])
    check_stats(rowpass.row_stats(x, y, spec), ref.row_stats(x, y, spec), TOL["f32"])


def test_bad_launch_config(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 48)
    with pytest.raises(ValueError, match="CUDA_THREADS_PER_BLOCK"):
        rowpass.row_stats(np.zeros((2, 3), np.float32), np.full(2, -1), StatsSpec())
