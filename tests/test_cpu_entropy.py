"""The CPU entropy walk (ptx_numba.cpu.entropy: plain specs plus entropy on the moment loops).

Compared with the float64 reference through the derived quantities (lse, ce, entropy
``log s - t/s``), on every encoding, adversarial rows, chunk and block tails, pieces of split rows,
shifts beyond the loop's range and NaN at every position; the other loop (``CPU_AVX2=False``)
runs the moments walk, and both must agree with the reference.
"""
import numpy as np
import pytest

from ptx_numba import config
from ptx_numba._rowpass import StatsSpec
from ptx_numba.reference import BACKEND as REFERENCE
from test_cpu_rowpass import (_NAN_POSITIONS, _NAN_VOCAB, CHUNK, DTYPES, adversarial, assert_stats_match,
                              encode, labels_for, tolerance)

cpu = pytest.importorskip("ptx_numba.cpu")
BACKEND = cpu.BACKEND
from ptx_numba.cpu import entropy  # noqa: E402
from ptx_numba.cpu.simd import isa  # noqa: E402

SPEC = StatsSpec(target=True, entropy=True)


@pytest.fixture
def loop(cpu_isa):
    """Each ISA's moment loop where the target has it, and the moments walk ("portable")."""
    return cpu_isa


def test_the_walk_takes_only_its_specs():
    assert entropy.handles(SPEC, isa.AVX2) and entropy.handles(StatsSpec(entropy=True), isa.AVX2)
    assert entropy.handles(SPEC, isa.AVX512)
    assert not entropy.handles(SPEC, isa.PORTABLE)
    for other in (StatsSpec(entropy=True, inv_temperature=2.0), StatsSpec(entropy=True, softcap=30.0),
                  StatsSpec(entropy=True, dsum=True), StatsSpec(entropy=True, pair=True),
                  StatsSpec(target=True)):
        assert not entropy.handles(other, isa.AVX2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [2 * CHUNK + 37, CHUNK, 17, 5, 1])
def test_entropy_matches_reference(loop, rng, dtype, vocab):
    z = adversarial(rng, vocab)
    x = encode(z, dtype)
    y = labels_for(rng, z)
    got = BACKEND.row_stats(x, y, SPEC)
    want = REFERENCE.row_stats(x, y, SPEC)
    assert_stats_match(got, want, vocab, tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rescans_and_offsets(loop, rng, dtype):
    vocab = 5 * CHUNK + 3
    z = rng.standard_normal((6, vocab)) * 2
    z[0, 3 * CHUNK + 5] += 90.0  # a late jump: the shift moves, t moves with it
    z[1] += 3e4
    z[1, 4 * CHUNK] += 40.0
    z[2] -= 3e4
    z[3, : 2 * CHUNK] = -np.inf  # the shift starts late
    z[3, 2 * CHUNK + 1] = 50.0
    z[4] = np.linspace(-80.0, 80.0, vocab)  # rising: a rescan in many chunks
    z[5] = 0.0  # uniform: H = log V exactly
    x = encode(z, dtype)
    y = rng.integers(0, vocab, len(z)).astype(np.int64)
    got = BACKEND.row_stats(x, y, SPEC)
    assert_stats_match(got, REFERENCE.row_stats(x, y, SPEC), vocab, tolerance(dtype))
    h = np.log(got.s[5]) - got.t[5] / got.s[5]
    assert abs(h - np.log(vocab)) <= tolerance(dtype) * np.log(vocab)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shift_beyond_the_loop_range_falls_back(loop, rng, dtype):
    # |x| past the loop's S limit (~3.6e5 for float32 lanes): the moments walk takes the piece
    z = rng.standard_normal((3, 3001)) * 2
    z[0] += 1e6
    z[1, 1500] = 4e5
    z[2] -= 5e5
    x = encode(z, dtype)
    y = np.array([1, 1500, 2], dtype=np.int64)
    assert_stats_match(BACKEND.row_stats(x, y, SPEC), REFERENCE.row_stats(x, y, SPEC), 3001, tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [1, 3])
def test_rows_split_into_pieces(loop, rng, monkeypatch, dtype, n_rows):
    vocab = 5 * config.CPU_MIN_SEGMENT + 123
    monkeypatch.setattr(cpu.rowpass.numba, "get_num_threads", lambda: 8)
    assert cpu.pieces_per_row(n_rows, vocab) > 1
    z = rng.standard_normal((n_rows, vocab)) * 4 + 1e4
    z[0, ::5] = -np.inf
    z[-1, 3 * config.CPU_MIN_SEGMENT + 11] += 70.0  # a late jump inside a later piece
    z[0, config.CPU_MIN_SEGMENT:2 * config.CPU_MIN_SEGMENT + 400] = -np.inf  # a piece of only -inf
    x = encode(z, dtype)
    y = rng.integers(0, vocab, n_rows).astype(np.int64)
    assert_stats_match(BACKEND.row_stats(x, y, SPEC), REFERENCE.row_stats(x, y, SPEC), vocab, tolerance(dtype))


def test_strided_rows_read_in_place(loop, rng):
    flat = encode(rng.standard_normal((14, 301)) * 3, "bfloat16")
    views = [flat[:, :-1], flat.reshape(2, 7, 301)[:, :-1][1], flat[::-3], flat[3:4]]
    for x in views:
        y = rng.integers(0, x.shape[1], x.shape[0]).astype(np.int64)
        got = BACKEND.row_stats(x, y, SPEC)
        want = BACKEND.row_stats(np.ascontiguousarray(x), y, SPEC)
        for a, b in zip(got, want):
            if a is not None:
                np.testing.assert_array_equal(a, b)
        assert_stats_match(got, REFERENCE.row_stats(x, y, SPEC), x.shape[1], tolerance("bfloat16"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", list(_NAN_POSITIONS))
@pytest.mark.parametrize("around", ["-inf", "finite"])
def test_nan_propagates_at_every_position(loop, dtype, where, around):
    z = np.zeros((2, _NAN_VOCAB))
    pos = _NAN_POSITIONS[where]
    if around == "-inf":
        z[:, : pos + 2] = -np.inf
        if pos + 2 >= _NAN_VOCAB:
            z[:, :pos - 3] = 0.0
    z[:, pos] = np.nan
    z[1, :] = np.where(np.isnan(z[1]), 0.0, z[1])
    x = encode(z, dtype)
    st = BACKEND.row_stats(x, np.array([1, 1]), SPEC)
    assert np.isnan(st.m[0]) and np.isnan(st.s[0]) and np.isnan(st.t[0])
    assert np.isfinite(st.m[1]) and np.isfinite(st.s[1]) and np.isfinite(st.t[1])


@pytest.mark.parametrize("seed", [4, 196, 258])
def test_a_first_shift_far_below_the_max_keeps_the_entropy_contract(loop, seed):
    """float16 logits at +-3e4 are multiples of 16; rows whose first entry sat one step below the
    max left the shift 16 under it, and H = log s - t/s missed the contract by up to 5x (these
    seeds of the adversarial rows, found by a sweep of 400). The moment walks now rescan sooner."""
    rng = np.random.default_rng(seed)
    z = adversarial(rng, 2048)
    x = encode(z, "float16")
    y = labels_for(rng, z)
    got = BACKEND.row_stats(x, y, SPEC)
    assert_stats_match(got, REFERENCE.row_stats(x, y, SPEC), 2048, tolerance("float16"))
