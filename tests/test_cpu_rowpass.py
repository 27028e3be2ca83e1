"""The CPU row pass (ptx_numba.cpu.BACKEND.row_stats) against the float64 reference and SciPy.

Statistics are compared through the quantities the ops derive from them (lse, ce, entropy
``log s - t/s``, mean logit ``m + d/V``, KL ``u/s - log s + log s_w``), since the shift ``m`` of a
backend is its own choice; special rows (NaN, +inf, all -inf) must carry the canonical values.
"""
import numpy as np
import pytest
from scipy.special import logsumexp as scipy_lse

from exact import cast
from ptx_numba import _validate, config
from ptx_numba._rowpass import StatsSpec
from ptx_numba.reference import BACKEND as REFERENCE

cpu = pytest.importorskip("ptx_numba.cpu")
BACKEND = cpu.BACKEND

DTYPES = ["float32", "float64", "bfloat16", "float16"]
#: The field combinations the ops use.
SPECS = {
    "plain": StatsSpec(target=True),
    "smooth_softcap": StatsSpec(target=True, dsum=True, softcap=30.0),
    "entropy_temperature": StatsSpec(target=True, entropy=True, inv_temperature=1 / 0.7),
    "pair_target": StatsSpec(target=True, entropy=True, pair=True, inv_temperature=1.25),
}
CHUNK = config.CPU_CHUNK


@pytest.fixture
def loop(cpu_isa):
    """Every loop of the plain walk (the moments walk has one; see ``cpu_isa`` in conftest.py)."""
    return cpu_isa


def encode(z64, dtype):
    """float64 values -> the encoded block the kernels read (and its exact float64 values)."""
    with np.errstate(invalid="ignore", over="ignore"):
        raw = cast(z64, dtype)
    x, _, _ = _validate.as_host_logits(raw)
    return x


def derived(st, vocab):
    with np.errstate(all="ignore"):
        log_s = np.log(st.s)
        out = {"m": st.m, "s": st.s, "lse": st.m + log_s}
        if st.target is not None:
            out["target"] = st.target
            out["ce"] = log_s - (st.target - st.m)
        if st.t is not None:
            out["entropy"] = log_s - st.t / st.s
        if st.d is not None:
            out["mean"] = st.m + st.d / vocab
        if st.u is not None:
            out["kl"] = st.u / st.s - log_s + np.log(st.s_w)
            out["lse_w"] = st.m_w + np.log(st.s_w)
            if st.target_w is not None:
                out["target_w"] = st.target_w
    return out


def assert_stats_match(got, want, vocab, tol):
    """Derived quantities within ``tol`` relative to max(1, |exact|); special rows canonical."""
    assert set(f for f, v in zip(got._fields, got) if v is not None) == \
        set(f for f, v in zip(want._fields, want) if v is not None)
    special = ~np.isfinite(want.m)
    if want.m_w is not None:
        special_w = ~np.isfinite(want.m_w)
    np.testing.assert_array_equal(got.m[special], want.m[special])
    np.testing.assert_array_equal(got.s[special], want.s[special])
    g, w = derived(got, vocab), derived(want, vocab)
    for key in w:
        if key in ("m", "s"):
            continue
        rows = ~special
        if key == "lse_w":
            rows = ~special_w
        if key == "kl":
            rows = ~special & ~special_w
        a, b = g[key][rows], w[key][rows]
        finite = np.isfinite(b)
        np.testing.assert_array_equal(a[~finite], b[~finite], err_msg=key)
        err = np.abs(a[finite] - b[finite]) / np.maximum(1.0, np.abs(b[finite]))
        assert err.size == 0 or err.max() <= tol, (key, err.max())
        if key in ("entropy", "mean", "kl") and special.any():
            assert np.isnan(g[key][special]).all(), key  # canonical: NaN in special rows


def tolerance(dtype):
    return 1e-10 if dtype == "float64" else 2e-5


def adversarial(rng, vocab):
    """Rows every backend must get right (shape [12, vocab], float64)."""
    z = rng.standard_normal((12, vocab)) * 3
    z[1] += 3e4
    z[2] -= 3e4
    z[3, vocab // 3] += 60.0  # one logit far above the rest
    z[4] = 1.5  # constant
    z[5, ::7] = -np.inf  # masked vocabulary, first entry included
    z[6] = -np.inf
    z[7, vocab // 2] = np.inf
    z[8, vocab - 1] = np.nan
    z[9, : vocab // 2] = -np.inf  # leading masked entries
    z[10, 0] = 25.0  # a first entry far above the rest seeds the shift
    z[11, 0] = -200.0  # ... and far below
    return z


def labels_for(rng, z):
    y = rng.integers(0, z.shape[1], z.shape[0])
    y[0] = -1
    y[5] = 0  # a label at a -inf logit: infinite CE
    return y.astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [2 * CHUNK + 37, 5])
def test_plain_matches_reference_and_scipy(loop, rng, dtype, vocab):
    z = adversarial(rng, vocab)
    x = encode(z, dtype)
    y = labels_for(rng, z)
    spec = SPECS["plain"]
    got = BACKEND.row_stats(x, y, spec)
    want = REFERENCE.row_stats(x, y, spec)
    assert_stats_match(got, want, vocab, tolerance(dtype))
    with np.errstate(all="ignore"):
        lse = got.m + np.log(got.s)
        exact = scipy_lse(_validate.decode_to_float64(x), axis=1)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(exact))
    ok = np.isfinite(exact)
    assert np.all(np.abs(lse[ok] - exact[ok]) <= tolerance(dtype) * np.maximum(1, np.abs(exact[ok])))
    np.testing.assert_array_equal(lse[~ok & ~np.isnan(exact)], exact[~ok & ~np.isnan(exact)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["smooth_softcap", "entropy_temperature", "pair_target"])
@pytest.mark.parametrize("vocab", [2 * CHUNK + 37, 3])
def test_moments_match_reference(rng, dtype, name, vocab):
    spec = SPECS[name]
    z = adversarial(rng, vocab)
    x = encode(z, dtype)
    y = labels_for(rng, z)
    w = None
    if spec.pair:
        v = z + rng.standard_normal(z.shape) * 0.5  # a nearby reference policy
        v[3] -= 40.0  # and one far from it
        v[9, : vocab // 2 + 1] = -np.inf  # w masked where z has mass: infinite KL
        v[4, 1] = np.nan
        w = encode(v, dtype)
    got = BACKEND.row_stats(x, y, spec, w)
    want = REFERENCE.row_stats(x, y, spec, w)
    assert_stats_match(got, want, vocab, tolerance(dtype))


def test_pair_mixed_encodings(rng):
    z = rng.standard_normal((3, 1000)) * 2
    x, w = encode(z, "float32"), encode(z[::-1] * 0.5, "bfloat16")
    y = np.array([0, -1, 999])
    spec = StatsSpec(pair=True, target=True)
    assert_stats_match(BACKEND.row_stats(x, y, spec, w), REFERENCE.row_stats(x, y, spec, w), 1000, 2e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_empty_block_and_empty_rows(name):
    spec = SPECS[name]
    x = np.zeros((0, 7), np.float32)
    got = BACKEND.row_stats(x, np.zeros(0, np.int64), spec, x if spec.pair else None)
    assert all(v is None or v.shape == (0,) for v in got)
    x = np.zeros((2, 0), np.float32)
    got = BACKEND.row_stats(x, np.full(2, -1, np.int64), spec, x if spec.pair else None)
    # rows of no entries are all -inf rows: m = -inf, s = 0, every other field NaN
    for field, value in zip(got._fields, got):
        if value is not None:
            want = -np.inf if field in ("m", "m_w") else 0.0 if field in ("s", "s_w") else np.nan
            np.testing.assert_array_equal(value, np.full(2, want), err_msg=field)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("n_rows", [1, 2, 3])
def test_rows_split_into_pieces(loop, rng, monkeypatch, name, n_rows):
    spec = SPECS[name]
    vocab = 5 * config.CPU_MIN_SEGMENT + 123
    monkeypatch.setattr(cpu.rowpass.numba, "get_num_threads", lambda: 8)
    assert cpu.pieces_per_row(n_rows, vocab) > 1
    z = rng.standard_normal((n_rows, vocab)) * 4 + 1e4
    z[0, ::5] = -np.inf
    z[-1, 3 * config.CPU_MIN_SEGMENT + 11] += 70.0  # a late jump inside a later piece
    x = encode(z, "float32")
    w = encode(z[:, ::-1] - 2.0, "float32") if spec.pair else None
    y = rng.integers(0, vocab, n_rows).astype(np.int64)
    assert_stats_match(BACKEND.row_stats(x, y, spec, w), REFERENCE.row_stats(x, y, spec, w), vocab, 2e-5)


@pytest.mark.parametrize("name", ["plain", "entropy_temperature"])
def test_strided_rows_read_in_place(loop, rng, name):
    spec = SPECS[name]
    flat = encode(rng.standard_normal((14, 301)) * 3, "float32")
    big = flat.reshape(2, 7, 301)  # [B, T, V]
    shifted = big[:, :-1]  # the causal shift every LM loss does
    views = [flat[:, :-1], shifted[1], flat[::-3], flat[::-1], flat[3:4]]
    for x in views:
        y = rng.integers(0, x.shape[1], x.shape[0]).astype(np.int64)
        got = BACKEND.row_stats(x, y, spec)
        want = BACKEND.row_stats(np.ascontiguousarray(x), y, spec)
        for a, b in zip(got, want):
            if a is not None:
                np.testing.assert_array_equal(a, b)
        assert_stats_match(got, REFERENCE.row_stats(x, y, spec), x.shape[1], 2e-5)


def test_bad_blocks_raise_value_errors():
    y = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="unit stride"):
        BACKEND.row_stats(np.zeros((3, 8), np.float32)[:, ::2], y, SPECS["plain"])
    with pytest.raises(ValueError, match="dtype"):
        BACKEND.row_stats(np.zeros((3, 8), np.int32), y, SPECS["plain"])
    with pytest.raises(ValueError, match="int64"):
        BACKEND.row_stats(np.zeros((3, 8), np.float32), y.astype(np.int32), SPECS["plain"])
    with pytest.raises(ValueError, match="w of shape"):
        BACKEND.row_stats(np.zeros((3, 8), np.float32), y, SPECS["pair_target"])
    assert BACKEND.is_available() == (True, "")  # an argument error never marks the backend broken


# --- issue 14 item 1: a NaN among -inf values must poison the row ---------------------------
_NAN_VOCAB = 2 * CHUNK + 37
_NAN_POSITIONS = {"first": 0, "chunk_end": CHUNK - 1, "chunk_start": CHUNK, "tail": _NAN_VOCAB - 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", list(_NAN_POSITIONS))
@pytest.mark.parametrize("around", ["-inf", "finite"])
@pytest.mark.parametrize("name", ["plain", "entropy_temperature"])
def test_nan_propagates_at_every_position(loop, dtype, where, around, name):
    z = np.zeros((2, _NAN_VOCAB))
    pos = _NAN_POSITIONS[where]
    if around == "-inf":  # -inf up to and around the NaN, finite values later (or earlier)
        z[:, : pos + 2] = -np.inf
        if pos + 2 >= _NAN_VOCAB:
            z[:, :pos - 3] = 0.0
    z[:, pos] = np.nan
    z[1, :] = np.where(np.isnan(z[1]), 0.0, z[1])  # a clean row beside it stays clean
    x = encode(z, dtype)
    st = BACKEND.row_stats(x, np.array([1, 1]), SPECS[name])
    assert np.isnan(st.m[0]) and np.isnan(st.s[0])
    assert np.isfinite(st.m[1]) and np.isfinite(st.s[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["plain", "pair_target"])
def test_nan_at_a_piece_boundary(loop, monkeypatch, dtype, name):
    # the case: a NaN at the start of a piece whose first chunk is otherwise -inf
    monkeypatch.setattr(cpu.rowpass.numba, "get_num_threads", lambda: 8)
    vocab = 4 * config.CPU_MIN_SEGMENT
    assert cpu.pieces_per_row(1, vocab) == 4
    z = np.zeros((1, vocab))
    z[0, 16384:18432] = -np.inf
    z[0, 16384] = np.nan
    x = encode(z, dtype)
    spec = SPECS[name]
    st = BACKEND.row_stats(x, np.array([0]), spec, x if spec.pair else None)
    assert np.isnan(st.m[0]) and np.isnan(st.s[0])
    if spec.pair:
        assert np.isnan(st.m_w[0]) and np.isnan(st.u[0])


def test_each_loop_compiles_its_own_kernel(loop, rng):
    # the plain kernel is specialised on the ISA marker's type: the chosen loop really ran
    from ptx_numba.cpu import rowpass

    x = rng.standard_normal((3, 5000)).astype(np.float32)
    st = cpu.BACKEND.row_stats(x, np.array([0, 4, -1]), SPECS["plain"])
    np.testing.assert_allclose(st.m + np.log(st.s), scipy_lse(x.astype(np.float64), axis=1), rtol=2e-7)
    names = {str(sig[0]) for sig in rowpass.plain_kernel.signatures}
    assert f"ptx_numba.isa.{loop}" in names, names
