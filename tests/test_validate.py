"""Input validation and coercion: every bad input is refused with a message naming the problem;
every accepted layout/dtype is read as the values it holds; the caller's arrays are never touched.
"""
import math
import re
import sys

import ml_dtypes
import numpy as np
import pytest

import ptx_numba as pn
from exact import ce64, lse64
from ptx_numba import _dispatch, config
from ptx_numba._validate import BF16, F16, Batch, decode_to_float64, prepare
from ptx_numba.contract import TOL_FLOAT32, TOL_FLOAT64

HOST_BACKENDS = [b for b in pn.available_backends() if b != "cuda"]


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    yield
    _dispatch._reset_for_tests()


LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]


# ------------------------------------------------------------------------------------------
# bad labels
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["ptx", "ce", "ce_none"])
@pytest.mark.parametrize(
    "labels, row, value",
    [([0, 3], 1, 3), ([-1, 0], 0, -1), ([0, -101], 1, -101), ([2, 10**9], 1, 10**9)],
)
def test_label_out_of_range_names_row_and_value(fn, labels, row, value):
    call = {
        "ptx": lambda: pn.ptx_loss(0.0, LOGITS, labels, 0.1),
        "ce": lambda: pn.cross_entropy(LOGITS, labels),
        "ce_none": lambda: pn.cross_entropy(LOGITS, labels, reduction="none"),
    }[fn]
    with pytest.raises(ValueError, match=rf"labels\[{row}\] = {value}\b.*V = 3.*row {row}"):
        call()


def test_label_error_multi_dim_names_position_and_flat_row():
    z = np.zeros((2, 3, 5))
    y = np.zeros((2, 3), dtype=np.int64)
    y[1, 2] = 5
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 5 .*V = 5.*row 5"):
        pn.cross_entropy(z, y)


def test_first_bad_label_is_reported():
    with pytest.raises(ValueError, match=r"labels\[1\] = 9"):
        pn.cross_entropy(np.zeros((4, 3)), [0, 9, -5, 7])


def test_custom_ignore_index():
    z = np.zeros((3, 4))
    # -1 is now the ignore marker, so it is fine...
    assert pn.cross_entropy(z, [0, -1, 2], ignore_index=-1) == pytest.approx(math.log(4))
    # ...and -100 is an ordinary out-of-range label
    with pytest.raises(ValueError, match=r"labels\[1\] = -100.*ignore_index = -1"):
        pn.cross_entropy(z, [0, -100, 2], ignore_index=-1)
    # an ignore_index inside [0, V) ignores that class
    assert pn.cross_entropy(z, [3, 3, 3], ignore_index=3) == 0.0
    assert pn.cross_entropy(z, [1, 3, 3], ignore_index=np.int32(3), reduction="sum") == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0.0, 0.5], r"labels\[1\] = .*0\.5.*not integral"),
        ([0.0, np.nan], r"labels\[1\] = .*nan.*not integral"),
        ([np.inf, 0.0], r"labels\[0\] = .*inf.*not integral"),
        (np.array([[0.0, 1.0], [1.25, 0.0]]), r"labels\[1, 0\] = .*1\.25.*not integral"),
    ],
)
def test_non_integral_float_labels(labels, match):
    z = np.zeros(np.shape(labels) + (3,))
    with pytest.raises(ValueError, match=match):
        pn.cross_entropy(z, labels)


@pytest.mark.parametrize(
    "labels, exc, match",
    [
        (np.array([True, False]), TypeError, "boolean"),
        ([True, False], TypeError, "boolean"),
        (np.array(["0", "1"]), TypeError, "labels must be integers"),
        ("01", TypeError, "labels must be numeric"),
        (np.array([0, 1], dtype=complex), TypeError, "labels must be integers.*complex"),
        (np.array([0, 1], dtype=object), TypeError, "labels must be integers.*object"),
        (None, TypeError, "labels is None"),
        ([[0], [1, 2]], ValueError, "labels is ragged"),
    ],
)
def test_bad_label_types(labels, exc, match):
    with pytest.raises(exc, match=match):
        pn.cross_entropy(LOGITS, labels)
    with pytest.raises(exc, match=match):
        pn.ptx_loss(0.0, LOGITS, labels, 0.1)


@pytest.mark.parametrize(
    "logits_shape, labels_shape",
    [((2, 4), (3,)), ((2, 4), (2, 1)), ((2, 3, 4), (2,)), ((2, 3, 4), (3, 2)), ((2, 4), ()), ((6, 4), (2, 3))],
)
def test_shape_mismatch_names_both_shapes(logits_shape, labels_shape):
    z = np.zeros(logits_shape)
    y = np.zeros(labels_shape, dtype=np.int64)
    pat = rf"labels shape {re.escape(str(labels_shape))} does not match logits shape {re.escape(str(logits_shape))}"
    with pytest.raises(ValueError, match=pat):
        pn.cross_entropy(z, y)
    with pytest.raises(ValueError, match=pat):
        pn.ptx_loss(1.0, z, y, 0.5)


# ------------------------------------------------------------------------------------------
# bad logits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "logits, exc, match",
    [
        (np.float64(1.0), ValueError, r"at least 2 dimensions.*shape \(\)"),
        (np.array(2.0), ValueError, r"at least 2 dimensions.*shape \(\)"),
        ([1.0, 2.0, 3.0], ValueError, r"at least 2 dimensions.*shape \(3,\)"),
        (np.zeros((2, 0)), ValueError, r"V == 0.*\(2, 0\)"),
        (np.zeros((0, 0)), ValueError, r"V == 0"),
        (np.zeros((2, 3, 0)), ValueError, r"V == 0.*\(2, 3, 0\)"),
        (np.zeros((2, 3), dtype=complex), TypeError, "complex"),
        (np.zeros((2, 3), dtype=np.complex64), TypeError, "complex"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, r"logits must be real numbers.*<U1"),
        ("abc", TypeError, "logits must be numeric"),
        (b"abc", TypeError, "logits must be numeric"),
        (np.empty((2, 3), dtype=object), TypeError, "object"),
        ([[1.0, 2.0], [3.0]], ValueError, "logits is ragged"),
        ([[1.0, "x"], [3.0, 4.0]], TypeError, "logits must be real numbers"),
        ([[1.0, None], [3.0, 4.0]], ValueError, "logits is ragged or holds non-numbers"),
        (None, TypeError, "logits is None"),
        (np.zeros((2, 3), dtype=bool), TypeError, "boolean"),
        ([[True, False], [False, True]], TypeError, "boolean"),
        (np.zeros((2, 3), dtype="datetime64[s]"), TypeError, "logits must be real numbers"),
    ],
    ids=lambda v: repr(v)[:40] if not isinstance(v, type) else v.__name__,
)
def test_bad_logits(logits, exc, match):
    labels = [0, 0]
    with pytest.raises(exc, match=match):
        pn.logsumexp(logits)
    with pytest.raises(exc, match=match):
        pn.cross_entropy(logits, labels)
    with pytest.raises(exc, match=match):
        pn.ptx_loss(0.0, logits, labels, 0.1)


# ------------------------------------------------------------------------------------------
# bad scalars and options
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rl_loss", "beta"])
@pytest.mark.parametrize(
    "value, exc, match",
    [
        (math.nan, ValueError, "must be finite, got nan"),
        (math.inf, ValueError, "must be finite, got inf"),
        (-math.inf, ValueError, "must be finite, got -inf"),
        (np.float32("nan"), ValueError, "must be finite"),
        (None, TypeError, "must be a real number, got None"),
        ("0.5", TypeError, "must be a real number"),
        (True, TypeError, "must be a real number, got True"),
        (np.bool_(False), TypeError, "must be a real number"),
        (1 + 2j, TypeError, "must be a real number, got complex"),
        ([0.5], TypeError, "must be a real number, got list"),
        (object(), TypeError, "must be a real number, got object"),
    ],
    ids=repr,
)
def test_bad_rl_loss_and_beta(name, value, exc, match):
    args = {"rl_loss": 0.0, "beta": 0.1, name: value}
    with pytest.raises(exc, match=f"{name} {match}"):
        pn.ptx_loss(args["rl_loss"], LOGITS, [0, 1], args["beta"])


@pytest.mark.parametrize("value", [1, np.float32(0.25), np.int64(2), np.array(0.5), -3.0, 0])
def test_good_scalars_are_accepted(value):
    r = pn.ptx_loss(value, LOGITS, [0, 1], value)
    assert type(r.total) is float and type(r.ptx) is float
    assert r.ptx == float(value) * r.ce
    assert r.total == float(value) + r.ptx


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, 0, "elementwise_mean"])
def test_bad_reduction(reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\)"):
        pn.cross_entropy(LOGITS, [0, 1], reduction=reduction)


@pytest.mark.parametrize("ignore_index", [-100.0, 1.5, True, False, "x", None, np.float64(-100), np.bool_(True)])
def test_bad_ignore_index(ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        pn.cross_entropy(LOGITS, [0, 1], ignore_index=ignore_index)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        pn.ptx_loss(0.0, LOGITS, [0, 1], 0.1, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", ["gpu", "CPU", "", None, "numba", 3])
def test_unknown_backend_lists_valid_ones(backend):
    for call in (
        lambda: pn.ptx_loss(0.0, LOGITS, [0, 1], 0.1, backend=backend),
        lambda: pn.cross_entropy(LOGITS, [0, 1], backend=backend),
        lambda: pn.logsumexp(LOGITS, backend=backend),
    ):
        with pytest.raises(ValueError, match=r"unknown backend .*valid backends are .*'auto'.*'cpu'.*'reference'"):
            call()


# ------------------------------------------------------------------------------------------
# coercions: each variant must read the same values as a plain C-contiguous float64 array
# ------------------------------------------------------------------------------------------
def _layout_variants(rng):
    base = rng.normal(0, 2, size=(4, 6, 9))
    big = base.astype(">f8")
    ro = base.copy()
    ro.flags.writeable = False
    wide = np.zeros((4, 6, 20))
    wide[:, :, ::2][:, :, :9] = base  # strided last axis
    rev = base[:, :, ::-1].copy()[:, :, ::-1]  # negative stride view with base's values
    return {
        "fortran": (np.asfortranarray(base), base),
        "strided_last_axis": (wide[:, :, ::2][:, :, :9], base),
        "strided_rows": (np.repeat(base, 2, axis=0)[::2], base),
        "negative_strides": (rev, base),
        "transposed_batch": (np.ascontiguousarray(base.transpose(1, 0, 2)).transpose(1, 0, 2), base),
        "big_endian_f8": (big, base),
        "big_endian_f4": (base.astype(">f4"), base.astype(np.float32)),
        "big_endian_f2": (base.astype(">f2"), base.astype(np.float16)),
        "read_only": (ro, base),
        "broadcast": (np.broadcast_to(base[:1], base.shape), np.repeat(base[:1], 4, axis=0)),
        "float16": (base.astype(np.float16), base.astype(np.float16)),
        "bfloat16": (base.astype(ml_dtypes.bfloat16), base.astype(ml_dtypes.bfloat16)),
        "bfloat16_fortran": (np.asfortranarray(base.astype(ml_dtypes.bfloat16)), base.astype(ml_dtypes.bfloat16)),
        "int32": (np.round(base * 10).astype(np.int32), np.round(base * 10)),
        "uint8": (np.arange(4 * 6 * 9, dtype=np.uint8).reshape(4, 6, 9), np.arange(4 * 6 * 9.0).reshape(4, 6, 9)),
        "nested_int_list": (np.round(base).astype(int).tolist(), np.round(base)),
        "nested_float_list": (base.tolist(), base),
        "longdouble": (base.astype(np.longdouble), base),
        "float8_e5m2": (base.astype(ml_dtypes.float8_e5m2), base.astype(ml_dtypes.float8_e5m2).astype(np.float32)),
        "float8_e4m3fn": (base.astype(ml_dtypes.float8_e4m3fn), base.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)),
        "time_slice": (np.concatenate([base, base[:, :1] + 1.0], axis=1)[:, :-1], base),
        "vocab_slice": (np.concatenate([base, base[:, :, :1] + 1.0], axis=2)[:, :, :-1], base),
        "reversed_vocab": (np.ascontiguousarray(base[:, :, ::-1])[:, :, ::-1], base),
    }


VARIANTS = list(_layout_variants(np.random.default_rng(0)))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_coercions_read_the_same_values(rng, variant, backend):
    logits, same_values = _layout_variants(rng)[variant]
    values = np.asarray(same_values).astype(np.float64)
    labels = rng.integers(0, 9, size=(4, 6))
    labels[0, 0] = -100
    narrow = np.asarray(same_values).dtype in (np.float16, np.float32, np.dtype(ml_dtypes.bfloat16))
    tol = TOL_FLOAT32 if narrow else TOL_FLOAT64
    lse = pn.logsumexp(logits, backend=backend)
    assert lse.shape == (4, 6)
    assert lse.dtype == (np.float32 if narrow else np.float64)
    want = lse64(values).reshape(4, 6)
    np.testing.assert_allclose(lse, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))
    rows = pn.cross_entropy(logits, labels, reduction="none", backend=backend)
    flat = values.reshape(-1, 9)
    y = labels.reshape(-1)
    want_ce = ce64(flat, y)
    np.testing.assert_allclose(rows.reshape(-1), want_ce, rtol=0, atol=tol * max(1.0, np.abs(want_ce).max()))


def blocks_of(batch):
    return list(batch.blocks())


def joined(batch):
    """Every block decoded to float64 and stacked: the [N, V] values the kernels read."""
    parts = [decode_to_float64(b.x) for b in batch.blocks()]
    return np.concatenate(parts) if parts else np.zeros((0, batch.vocab))


def test_nested_int_list_becomes_float64():
    batch = prepare([[1, 2, 3], [4, 5, 6]], [0, 2])
    assert batch.source_dtype == "float64" and batch.out_dtype == np.float64
    assert all(b.x.dtype == np.float64 for b in batch.blocks())
    assert pn.logsumexp([[1, 2, 3]]).dtype == np.float64
    assert pn.cross_entropy([[0, 0]], [1], reduction="none").dtype == np.float64


@pytest.mark.parametrize(
    "make, enc, source",
    [
        (lambda z: z.astype(np.float32), np.float32, "float32"),
        (lambda z: z.astype(">f4"), np.float32, "float32"),
        (lambda z: z.astype(np.float64), np.float64, "float64"),
        (lambda z: z.astype(np.float16), F16, "float16"),
        (lambda z: z.astype(">f2"), F16, "float16"),
        (lambda z: z.astype(ml_dtypes.bfloat16), BF16, "bfloat16"),
        (lambda z: z.astype(np.int16), np.float64, "float64"),
        (lambda z: z.astype(np.uint16), np.float64, "float64"),  # integers are values, not bits
        (lambda z: z.astype(np.longdouble), np.float64, "float64"),
        (lambda z: z.astype(ml_dtypes.float8_e5m2), np.float32, "float32"),
        (lambda z: z.astype(ml_dtypes.float8_e4m3fn), np.float32, "float32"),
    ],
)
def test_prepare_encodings(rng, make, enc, source):
    z = np.abs(rng.normal(0, 3, size=(2, 3, 5))).round(1)
    given = make(z)
    batch = prepare(given, np.zeros((2, 3), np.int64))
    assert isinstance(batch, Batch)
    assert batch.source_dtype == source
    assert batch.batch_shape == (2, 3) and batch.vocab == 5 and batch.n_rows == 6
    assert not batch.on_device
    assert batch.out_dtype == (np.float64 if source == "float64" else np.float32)
    blocks = blocks_of(batch)
    assert blocks[0].start == 0 and blocks[-1].stop == 6
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))  # consecutive, in order
    for b in blocks:
        assert b.x.dtype == np.dtype(enc) and b.x.shape == (b.stop - b.start, 5) and b.w is None
        assert b.x.strides[-1] == b.x.itemsize  # unit stride along V
        assert not b.x.flags.writeable
    assert batch.nbytes == 6 * 5 * {"float64": 8, "float32": 4}.get(source, 2)
    assert batch.y.dtype == np.int64 and batch.y.shape == (6,) and batch.y.flags.c_contiguous
    # the encoding decodes to exactly the values the caller gave
    np.testing.assert_array_equal(joined(batch), np.asarray(given).astype(np.float64).reshape(6, 5))


def test_prepare_labels_are_a_copy_with_minus_one_for_ignored():
    y = np.array([[0, 1], [2, -100]], dtype=np.int64)
    batch = prepare(np.zeros((2, 2, 3)), y)
    assert not np.shares_memory(batch.y, y)
    np.testing.assert_array_equal(batch.y, [0, 1, 2, -1])
    np.testing.assert_array_equal(batch.valid, [True, True, True, False])
    np.testing.assert_array_equal(y, [[0, 1], [2, -100]])  # the caller's labels untouched
    # a custom ignore_index inside [0, V) becomes -1 too; -100 is then out of range
    np.testing.assert_array_equal(prepare(np.zeros((3, 3)), [2, 0, 2], ignore_index=2).y, [-1, 0, -1])
    # no labels: every row -1
    none = prepare(np.zeros((2, 4, 3)))
    assert none.y.dtype == np.int64 and none.y.shape == (8,) and (none.y == -1).all()


def test_prepare_tokens_name_in_errors():
    with pytest.raises(ValueError, match=r"tokens\[1\] = 7 is out of range"):
        prepare(np.zeros((2, 3)), [0, 7], labels_name="tokens")
    with pytest.raises(ValueError, match=r"tokens shape \(3,\) does not match logits shape"):
        prepare(np.zeros((2, 3)), [0, 1, 2], labels_name="tokens")


# ------------------------------------------------------------------------------------------
# row blocks: read in place when the rows can be, else converted in bounded blocks
# ------------------------------------------------------------------------------------------
def _in_place_cases(rng):
    flat = rng.normal(0, 2, size=(13, 11)).astype(np.float32)
    cube = rng.normal(0, 2, size=(3, 5, 11))
    bf = rng.normal(0, 2, size=(4, 7)).astype(ml_dtypes.bfloat16)
    return {
        "C_order_2d": (flat, 1),
        "C_order_3d": (cube, 1),
        "slice_vocab_2d": (flat[:, :-1], 1),  # x[:, :-1]: row stride > V, one strided block
        "slice_rows": (flat[2:9], 1),
        "every_other_row": (flat[::2], 1),
        "slice_vocab_3d": (cube[:, :, :-1], 1),
        "slice_time_3d": (cube[:, :-1], 3),  # [B, T, V][:, :-1]: B blocks of T - 1 rows
        "bfloat16": (bf, 1),
        "float16": (flat.astype(np.float16), 1),
        "read_only": (np.require(flat, requirements="C").view(), 1),
    }


IN_PLACE = list(_in_place_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("case", IN_PLACE)
def test_blocks_are_read_only_views_of_the_callers_array(rng, case, monkeypatch):
    monkeypatch.setattr(config, "COPY_BLOCK_BYTES", 64)  # must not matter for in-place reads
    arr, n_blocks = _in_place_cases(rng)[case]
    batch = prepare(arr)
    blocks = blocks_of(batch)
    assert len(blocks) == n_blocks
    for b in blocks:
        assert np.shares_memory(b.x, arr), case
        assert not b.x.flags.writeable
        assert b.x.strides[-1] == b.x.itemsize
    np.testing.assert_array_equal(joined(batch), np.asarray(arr).astype(np.float64).reshape(-1, arr.shape[-1]))
    assert arr.flags.writeable  # the caller's own flag is left alone


def _converted_cases(rng):
    z = rng.normal(0, 2, size=(6, 5, 13))
    return {
        "fortran": np.asfortranarray(z.astype(np.float32)),
        "big_endian_f4": z.astype(">f4"),
        "big_endian_f8": z.astype(">f8"),
        "big_endian_bf16": z.astype(ml_dtypes.bfloat16).astype(np.dtype(ml_dtypes.bfloat16).newbyteorder(">")),
        "int32": np.round(z * 10).astype(np.int32),
        "reversed_vocab": z.astype(np.float32)[:, :, ::-1],
        "strided_vocab": z[:, :, ::2],
        "float8_e5m2": z.astype(ml_dtypes.float8_e5m2),
        "float8_e4m3fn": z.astype(ml_dtypes.float8_e4m3fn),
    }


CONVERTED = list(_converted_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("case", CONVERTED)
def test_converted_inputs_go_in_bounded_blocks(rng, case, monkeypatch):
    arr = _converted_cases(rng)[case]
    v = arr.shape[-1]
    bound = 3 * v * 8 + 5  # a few rows of float64 per converted block
    monkeypatch.setattr(config, "COPY_BLOCK_BYTES", bound)
    batch = prepare(arr)
    blocks = blocks_of(batch)
    assert len(blocks) >= batch.n_rows // 3
    assert sum(b.stop - b.start for b in blocks) == batch.n_rows
    for b in blocks:
        assert b.x.nbytes <= bound, (case, b.x.shape, b.x.dtype)
        assert not np.shares_memory(b.x, arr)
        assert not b.x.flags.writeable
        assert b.x.strides[-1] == b.x.itemsize
    with np.errstate(invalid="ignore"):
        want = np.asarray(arr).astype(np.float64).reshape(-1, v)
    np.testing.assert_array_equal(joined(batch), want)
    # the ops see the same values as from a C-contiguous float64 copy
    y = rng.integers(0, v, size=arr.shape[:-1])
    got = pn.cross_entropy(arr, y, reduction="none", backend="reference")
    exp = pn.cross_entropy(np.ascontiguousarray(want).reshape(arr.shape), y, reduction="none", backend="reference")
    np.testing.assert_allclose(got, exp, rtol=0, atol=TOL_FLOAT32 * max(1.0, np.abs(exp).max()))


def test_second_logit_set_is_blocked_beside_the_first(rng, monkeypatch):
    v = 7
    monkeypatch.setattr(config, "COPY_BLOCK_BYTES", 2 * v * 8)
    z = rng.normal(size=(5, 3, v)).astype(np.float32)
    w = np.asfortranarray(rng.normal(size=(5, 3, v)))  # another layout and dtype
    batch = prepare(z, rng.integers(0, v, (5, 3)), other=w)
    blocks = blocks_of(batch)
    for b in blocks:
        assert b.w is not None and b.w.shape == b.x.shape
        assert b.x.dtype == np.float32 and b.w.dtype == np.float64
        assert np.shares_memory(b.x, z)
    np.testing.assert_array_equal(np.concatenate([b.w for b in blocks]), w.reshape(-1, v))
    with pytest.raises(ValueError, match=r"ref_logits shape \(5, 3, 6\) does not match logits shape \(5, 3, 7\)"):
        prepare(z, other=np.zeros((5, 3, 6)))


def test_empty_batch_has_no_or_empty_blocks():
    batch = prepare(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert batch.n_rows == 0 and batch.y.shape == (0,)
    assert sum(b.stop - b.start for b in batch.blocks()) == 0
    assert pn.logsumexp(np.zeros((2, 0, 4))).shape == (2, 0)


# ------------------------------------------------------------------------------------------
# issue 14, item 2: arguments outside int64 / float range, 8-bit float logits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**64, -(10**40)])
def test_ignore_index_outside_int64_is_accepted_and_matches_nothing(rng, backend, ignore_index):
    z = rng.normal(size=(4, 6))
    y = np.array([0, 5, 3, 1])
    before = pn.available_backends()
    got = pn.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", backend=backend)
    np.testing.assert_array_equal(got, pn.cross_entropy(z, y, reduction="none", backend=backend))
    assert pn.cross_entropy(z, y, ignore_index=ignore_index, backend=backend) > 0.0
    assert (prepare(z, y, ignore_index=ignore_index).y == y).all()  # no -1: nothing ignored
    assert pn.available_backends() == before  # and no backend marked broken
    # a label that is out of range still names the huge ignore_index
    with pytest.raises(ValueError, match=rf"ignore_index = {ignore_index}"):
        pn.cross_entropy(z, [0, -100, 1, 1], ignore_index=ignore_index, backend=backend)
    assert pn.available_backends() == before


@pytest.mark.parametrize("value", [2.0**63, -(2.0**63), 1e19, -1e30, 2.0**64])
def test_float_labels_outside_int64_are_rejected(value):
    """They would wrap (2**63 -> -2**63) and could match ignore_index=-2**63."""
    labels = np.array([0.0, value, 1.0])
    for ignore_index in (-100, -(2**63)):
        with pytest.raises(ValueError, match=r"labels\[1\] = .* too large for int64"):
            pn.cross_entropy(np.zeros((3, 4)), labels, ignore_index=ignore_index)


@pytest.mark.parametrize("name", ["beta", "rl_loss"])
@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_python_ints_beyond_float_are_value_errors(name, value):
    args = {"rl_loss": 0.0, "beta": 0.1, name: value}
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        pn.ptx_loss(args["rl_loss"], LOGITS, [0, 1], args["beta"])
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        pn.ptx_loss_and_grad(args["rl_loss"], LOGITS, [0, 1], args["beta"])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn], ids=lambda d: d.__name__)
def test_float8_logits_read_as_their_float32_values(rng, backend, dtype):
    z = rng.normal(0, 3, size=(5, 17)).astype(dtype)
    as32 = z.astype(np.float32)
    y = rng.integers(0, 17, 5)
    y[2] = -100
    lse = pn.logsumexp(z, backend=backend)
    assert lse.dtype == np.float32
    np.testing.assert_array_equal(lse, pn.logsumexp(as32, backend=backend))
    np.testing.assert_array_equal(pn.cross_entropy(z, y, reduction="none", backend=backend),
                                  pn.cross_entropy(as32, y, reduction="none", backend=backend))
    np.testing.assert_allclose(lse, lse64(as32), rtol=0, atol=TOL_FLOAT32 * max(1.0, np.abs(lse).max()))
    assert prepare(z).source_dtype == "float32"


@pytest.mark.parametrize(
    "labels",
    [
        np.array([[2, 0, 1], [1, 1, 0]]),
        [[2, 0, 1], [1, 1, 0]],
        np.array([[2.0, 0.0, 1.0], [1.0, 1.0, -0.0]]),
        np.array([[2, 0, 1], [1, 1, 0]], dtype=np.uint8),
        np.array([[2, 0, 1], [1, 1, 0]], dtype=">i4"),
        np.array([[2, 0, 1], [1, 1, 0]], dtype=np.float16),
        np.asfortranarray(np.array([[2, 0, 1], [1, 1, 0]], dtype=np.int32)),
        np.array([[2, 9, 0, 9, 1], [1, 9, 1, 9, 0]])[:, ::2],
    ],
    ids=["int64", "list", "float_integral", "uint8", "big_endian", "float16", "fortran", "strided"],
)
def test_label_coercions(labels):
    z = np.arange(18.0).reshape(2, 3, 3) % 5
    want = pn.cross_entropy(z, np.array([[2, 0, 1], [1, 1, 0]]), reduction="none", backend="reference")
    got = pn.cross_entropy(z, labels, reduction="none", backend="reference")
    np.testing.assert_array_equal(got, want)
    assert got.shape == (2, 3)


class ArrayLike:
    def __init__(self, a):
        self._a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def test_objects_with_dunder_array():
    z = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    want = pn.cross_entropy(z, [0, 1], backend="reference")
    assert pn.cross_entropy(ArrayLike(z), ArrayLike([0, 1]), backend="reference") == want
    np.testing.assert_array_equal(pn.logsumexp(ArrayLike(z)), pn.logsumexp(z))


# ------------------------------------------------------------------------------------------
# torch inputs (optional)
# ------------------------------------------------------------------------------------------
def test_torch_inputs_coerced():
    torch = pytest.importorskip("torch")
    z = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.25, -1.0]], requires_grad=True)
    batch = prepare(z, torch.tensor([0, -100]))
    assert batch.source_dtype == "float32" and all(b.x.dtype == np.float32 for b in batch.blocks())
    np.testing.assert_array_equal(batch.y, [0, -1])
    assert all(np.shares_memory(b.x, z.detach().numpy()) for b in batch.blocks())  # read in place
    for dt, enc in ((torch.bfloat16, BF16), (torch.float16, F16)):
        t = z.detach().to(dt)
        b = prepare(t.t(), torch.tensor([0, 1, 1]))  # non-contiguous too
        assert all(blk.x.dtype == enc for blk in b.blocks())
        np.testing.assert_array_equal(joined(b), t.t().double().numpy())
        # and through the public functions (a strided half tensor is copied as bits, not values)
        np.testing.assert_array_equal(pn.logsumexp(t.t(), backend="reference"),
                                      pn.logsumexp(t.t().float().numpy(), backend="reference"))
    with pytest.raises(TypeError, match="complex"):
        pn.logsumexp(torch.zeros(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="boolean"):
        pn.logsumexp(torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_torch_float_labels_are_read_as_values(dtype_name):
    """Half-precision torch labels must be read as numbers, not as their bit patterns."""
    torch = pytest.importorskip("torch")
    z = np.linspace(-3, 3, 2 * 40000).reshape(2, 40000)  # V large enough for any 16-bit pattern
    y = torch.tensor([1.0, 2.0], dtype=getattr(torch, dtype_name))
    want = pn.cross_entropy(z, [1, 2], reduction="none", backend="reference")
    np.testing.assert_array_equal(pn.cross_entropy(z, y, reduction="none", backend="reference"), want)
    with pytest.raises(ValueError, match="not integral"):
        pn.cross_entropy(z, torch.tensor([1.5, 2.0], dtype=getattr(torch, dtype_name)), backend="reference")


# ------------------------------------------------------------------------------------------
# the caller's arrays are never modified
# ------------------------------------------------------------------------------------------
def _flags(a):
    return (a.flags.writeable, a.flags.c_contiguous, a.flags.f_contiguous, a.dtype, a.shape, a.strides)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ">f4"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_inputs_never_modified(rng, backend, dtype, order):
    z = rng.normal(0, 3, size=(3, 4, 11)) + 100.0
    z[0, 0, 3] = -np.inf
    z[1, 2, :] = 7.0
    logits = np.asarray(z.astype(dtype), order=order)
    labels = rng.integers(0, 11, size=(3, 4))
    labels[2, 1] = -100
    labels = np.asarray(labels, order=order)
    x_copy, y_copy = logits.copy(order="A"), labels.copy(order="A")
    x_flags, y_flags = _flags(logits), _flags(labels)
    pn.logsumexp(logits, backend=backend)
    for red in ("none", "sum", "mean"):
        out = pn.cross_entropy(logits, labels, reduction=red, backend=backend)
    pn.ptx_loss(0.3, logits, labels, 0.1, backend=backend)
    out = pn.cross_entropy(logits, labels, reduction="none", backend=backend)
    out[...] = 123.0  # writing the result must not reach the input either
    assert logits.tobytes(order="A") == x_copy.tobytes(order="A")
    np.testing.assert_array_equal(labels, y_copy)
    assert _flags(logits) == x_flags and _flags(labels) == y_flags


def test_read_only_and_list_inputs_untouched():
    z = np.array([[1.0, 2.0], [3.0, np.nan]])
    z.flags.writeable = False
    y = [1, -100]
    r = pn.ptx_loss(0.0, z, y, 1.0)
    assert not z.flags.writeable and np.isnan(z[1, 1]) and y == [1, -100]
    assert r.ce == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)


def test_torch_inputs_never_modified():
    torch = pytest.importorskip("torch")
    z = torch.randn(3, 5, dtype=torch.float32).to(torch.bfloat16).requires_grad_(True)
    y = torch.tensor([0, -100, 4])
    z0, y0 = z.detach().clone(), y.clone()
    pn.ptx_loss(0.1, z, y, 0.5)
    pn.cross_entropy(z, y, reduction="none")
    assert torch.equal(z.detach(), z0) and torch.equal(y, y0)
    assert z.requires_grad and z.grad is None and z.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# decode_to_float64: exact for every 16-bit pattern
# ------------------------------------------------------------------------------------------
ALL_BITS = np.arange(1 << 16, dtype=np.uint32)


def _binary16_by_formula(bits, exponent_bits, mantissa_bits):
    """Value of a 16-bit IEEE-style float from sign/exponent/mantissa (independent of NumPy)."""
    bias = (1 << (exponent_bits - 1)) - 1
    sign = np.where(bits >> 15, -1.0, 1.0)
    exp = ((bits >> mantissa_bits) & ((1 << exponent_bits) - 1)).astype(np.int64)
    man = (bits & ((1 << mantissa_bits) - 1)).astype(np.float64) / (1 << mantissa_bits)
    normal = sign * np.ldexp(1.0 + man, exp - bias)
    sub = sign * np.ldexp(man, 1 - bias)
    special = np.where(man == 0, sign * np.inf, np.nan)
    return np.where(exp == 0, sub, np.where(exp == (1 << exponent_bits) - 1, special, normal))


def _f16_by_formula(bits):
    return _binary16_by_formula(bits, exponent_bits=5, mantissa_bits=10)


def _bf16_by_formula(bits):
    return _binary16_by_formula(bits, exponent_bits=8, mantissa_bits=7)


def test_decode_float16_every_pattern_exact():
    enc = ALL_BITS.astype(np.uint16).view(np.int16)
    got = decode_to_float64(enc)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _f16_by_formula(ALL_BITS))
    np.testing.assert_array_equal(got, ALL_BITS.astype(np.uint16).view(np.float16).astype(np.float64))
    np.testing.assert_array_equal(np.signbit(got), ALL_BITS >= 0x8000)  # -0.0 keeps its sign


def test_decode_bfloat16_every_pattern_exact():
    enc = ALL_BITS.astype(np.uint16)
    got = decode_to_float64(enc)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _bf16_by_formula(ALL_BITS))
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on signalling-NaN patterns
        np.testing.assert_array_equal(got, enc.view(ml_dtypes.bfloat16).astype(np.float64))
    np.testing.assert_array_equal(np.signbit(got), ALL_BITS >= 0x8000)


def test_decode_passes_float_values_through():
    z = np.array([[1.5, -np.inf, np.nan, 1e-300]])
    np.testing.assert_array_equal(decode_to_float64(z), z)
    np.testing.assert_array_equal(decode_to_float64(z.astype(np.float32)), z.astype(np.float32).astype(np.float64))


def test_validate_module_does_not_import_torch():
    """Validation looks torch up only if the caller imported it (checked in a fresh interpreter)."""
    import subprocess

    code = "import numpy, ptx_numba as pn, sys; pn.cross_entropy([[1.0, 2.0]], [0]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PTX_NUMBA_BACKEND": "reference", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
