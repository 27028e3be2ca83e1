"""``ptx-numba score`` on awkward inputs: non-regular files, JSON of non-finite results, a file
replaced mid-run, corrupt headers, 2-byte and structured dtypes, Fortran order, optional --beta."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ptx_numba import cli
from ptx_numba.cli import shard as shard_module
from exact import ce64, logp64
from test_cli import close, expected_loss, run_json, save


def run_err(capsys, *argv):
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptx-numba: error: ") and "Traceback" not in err, err
    assert "unexpected" not in lines[0], lines[0]
    return lines[0]


BETA0 = ("--beta", "1", "--rl-loss", "0")  # optional now; given so the tests also run on older CLIs


@pytest.fixture
def pair(rng, tmp_path):
    logits = (rng.standard_normal((7, 13)) * 3).astype(np.float32)
    labels = rng.integers(0, 13, size=7)
    labels[4] = -100
    return logits, labels, save(tmp_path, "x.npy", logits), save(tmp_path, "y.npy", labels)


# --- a fifo is refused instead of hanging ---------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("which", ["logits", "labels"])
def test_fifo_is_refused_not_waited_on(pair, tmp_path, which):
    _, _, x, y = pair
    fifo = str(tmp_path / "pipe.npy")
    os.mkfifo(fifo)
    argv = [fifo, y] if which == "logits" else [x, fifo]
    proc = subprocess.run([sys.executable, "-m", "ptx_numba.cli", "score", *argv, "--backend", "reference",
                           *BETA0], capture_output=True, text=True, timeout=60)  # the old CLI hung here forever
    assert proc.returncode == 1
    assert "not a regular file" in proc.stderr and which in proc.stderr


# --- --json is valid JSON, non-finite values are null --------------------------------------
def test_json_of_a_non_finite_loss_is_valid_json(capsys, tmp_path):
    logits = np.zeros((3, 4), np.float32)
    logits[1, 2] = np.inf  # +inf logit: lse = inf, CE of row 1 is nan (inf - inf)
    labels = np.array([0, 2, 1])
    capsys.readouterr()
    assert cli.main(["score", save(tmp_path, "x.npy", logits), save(tmp_path, "y.npy", labels),
                     "--beta", "0.5", "--rl-loss", "0", "--json", "--backend", "reference"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert result["finite"] is False and result["ce"] is None and result["total"] is None
    assert result["tokens"] == 3


def test_json_of_a_finite_loss_says_finite(capsys, pair):
    logits, labels, x, y = pair
    result = run_json(capsys, "score", x, y, "--backend", "reference")
    assert result["finite"] is True
    assert close(result["ce"], expected_loss(logits, labels, 1.0, 0.0)[2], "reference")


# --- one open file for the whole run ---------------------------------------------------------
def test_file_replaced_mid_run_does_not_mix_two_files(capsys, rng, tmp_path, monkeypatch):
    first = (rng.standard_normal((12, 9)) * 2).astype(np.float32)
    second = (first + rng.standard_normal((12, 9)) * 5 + 40).astype(np.float32)
    labels = rng.integers(0, 9, size=12)
    x, y = save(tmp_path, "x.npy", first), save(tmp_path, "y.npy", labels)
    real = shard_module._cross_entropy
    calls = []

    def replace_after_first_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # swap the file by path, as a writer with os.replace would
            np.save(str(tmp_path / "new.npy"), second)
            os.replace(str(tmp_path / "new.npy"), x)
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_module, "_cross_entropy", replace_after_first_block)
    result = run_json(capsys, "score", x, y, "--block-rows", "5", "--backend", "reference", *BETA0)
    assert len(calls) == 3
    assert close(result["ce"], expected_loss(first, labels, 1.0, 0.0)[2], "reference")


# --- corrupt headers are ordinary errors ------------------------------------------------------
def _npy_with_header(header: str) -> bytes:
    body = header.encode("latin1")
    pad = 64 - (10 + len(body) + 1) % 64
    body += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + b"\0" * 64


@pytest.mark.parametrize("header, fragment", [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 4), }", "shape"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4", "corrupt .npy header"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), } '''", "corrupt .npy header"),
    ("{'descr': 'zz9', 'fortran_order': False, 'shape': (3, 4), }", "corrupt .npy header"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 4), }", "truncated"),
    ("{'descr': '<f4', 'fortran_order': False}", "corrupt .npy header"),
], ids=["negative-shape", "unclosed", "trailing-string", "bad-descr", "huge-shape", "no-shape"])
def test_corrupt_header_is_a_one_line_error(capsys, pair, tmp_path, header, fragment):
    _, _, _, y = pair
    bad = tmp_path / "bad.npy"
    bad.write_bytes(_npy_with_header(header))
    line = run_err(capsys, "score", str(bad), y, *BETA0)
    assert fragment in line and "bad.npy" in line


# --- 2-byte data ---------------------------------------------------------------------------
def test_structured_two_byte_dtype_is_refused(capsys, pair, tmp_path):
    _, _, _, y = pair
    rec = np.zeros((7, 13), dtype=[("a", "i1"), ("b", "i1")])
    for extra in ([], ["--dtype", "bfloat16"]):
        assert "structured dtype" in run_err(capsys, "score", save(tmp_path, "r.npy", rec), y, *BETA0, *extra)


def test_raw_v2_needs_the_dtype_flag(capsys, rng, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    logits = rng.standard_normal((6, 10)).astype(ml_dtypes.bfloat16)
    labels = rng.integers(0, 10, size=6)
    x, y = save(tmp_path, "x.npy", logits), save(tmp_path, "y.npy", labels)
    assert "--dtype bfloat16" in run_err(capsys, "score", x, y, *BETA0)
    result = run_json(capsys, "score", x, y, "--dtype", "bfloat16", "--backend", "reference")
    assert close(result["ce"], expected_loss(logits.astype(np.float64), labels, 1, 0)[2], "reference")


@pytest.mark.parametrize("int_dtype", [np.uint16, np.int16])
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_two_byte_integer_bits_reinterpreted_with_the_flag(capsys, rng, tmp_path, int_dtype, half):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    kind = ml_dtypes.bfloat16 if half == "bfloat16" else np.float16
    logits = (rng.standard_normal((9, 21)) * 4).astype(kind)
    labels = rng.integers(0, 21, size=9)
    x = save(tmp_path, "x.npy", logits.view(int_dtype))
    y = save(tmp_path, "y.npy", labels)
    line = run_err(capsys, "score", x, y, *BETA0)  # silently integer logits before (ce 17554 instead of 16)
    assert "2-byte integers" in line and "--dtype bfloat16" in line
    result = run_json(capsys, "score", x, y, "--dtype", half, "--block-rows", "4", "--backend", "reference")
    assert close(result["ce"], expected_loss(logits.astype(np.float64), labels, 1, 0)[2], "reference")


def test_dtype_flag_on_a_float32_file_is_refused(capsys, pair):
    _, _, x, y = pair
    assert "reinterprets 2-byte files" in run_err(capsys, "score", x, y, "--dtype", "float16")
    assert "expected one of bfloat16, float16" in run_err(capsys, "score", x, y, "--dtype", "")


def test_object_logits_never_unpickled(capsys, pair, tmp_path):
    _, _, _, y = pair
    path = str(tmp_path / "obj.npy")
    np.save(path, np.array([[{"a": 1}, None]] * 7, dtype=object), allow_pickle=True)
    assert "never unpickled" in run_err(capsys, "score", path, y, *BETA0)


# --- Fortran order ---------------------------------------------------------------------------
@pytest.mark.parametrize("flat_labels", [False, True])
def test_fortran_ordered_3d_logits_are_scored(capsys, rng, tmp_path, flat_labels):
    logits = (rng.standard_normal((3, 5, 11)) * 3).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 5))
    labels[2, 1] = -100
    x = save(tmp_path, "x.npy", np.asfortranarray(logits))
    y = save(tmp_path, "y.npy", labels.reshape(-1) if flat_labels else np.asfortranarray(labels))
    out = str(tmp_path / "rows.npy")
    result = run_json(capsys, "score", x, y, "--block-rows", "4", "--backend", "reference", "--per-row", out)
    # With --per-row the mean is formed from the float32 per-row values that are written.
    assert close(result["ce"], expected_loss(logits, labels, 1, 0)[2], "cpu")
    want = ce64(logits.reshape(15, 11), labels.reshape(-1))
    np.testing.assert_allclose(np.load(out), want, rtol=2e-6, atol=2e-6)


# --- --beta/--rl-loss optional, backend named -------------------------------------------------
def test_without_beta_reports_mean_ce_and_tokens(capsys, pair):
    logits, labels, x, y = pair
    result = run_json(capsys, "score", x, y, "--backend", "reference")
    assert "total" not in result and "ptx" not in result
    assert result["tokens"] == 6 and result["backend"] == "reference"
    assert close(result["ce"], expected_loss(logits, labels, 1, 0)[2], "reference")


def test_json_names_the_backend_that_ran(capsys, pair):
    import ptx_numba
    _, _, x, y = pair
    result = run_json(capsys, "score", x, y)
    want = "cpu" if "cpu" in ptx_numba.available_backends() else "reference"
    assert result["backend"] == want


def test_per_row_logprobs(capsys, pair, tmp_path):
    logits, labels, x, y = pair
    out = str(tmp_path / "lp.npy")
    run_json(capsys, "score", x, y, "--per-row", out, "--op", "logprobs", "--backend", "reference")
    got = np.load(out)
    valid = labels != -100
    want = np.where(valid, logp64(logits)[np.arange(7), np.where(valid, labels, 0)], 0.0)
    assert got.dtype == np.float32 and got.shape == (7,)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert math.copysign(1.0, got[4]) == 1.0  # ignored row: +0.0


# --- bench arguments ---------------------------------------------------------------------------
def test_bench_csv_into_a_missing_directory_is_an_error(capsys, tmp_path):
    target = tmp_path / "nonexistent" / "dir" / "x.csv"
    line = run_err(capsys, "bench", "--vocab", "10", "--rows", "1", "--repeat", "1", "--backends",
                   "reference", "--csv", str(target))
    assert "does not exist" in line
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("option", ["--dtype", "--backends"])
def test_bench_empty_name_list_is_an_error(capsys, option):
    assert "expected comma-separated names" in run_err(capsys, "bench", option, "")


def test_ignore_index_outside_int64_is_refused(capsys, pair):
    _, _, x, y = pair
    assert "int64" in run_err(capsys, "score", x, y, "--ignore-index", str(2**63))


def test_one_mapping_at_a_time_from_one_descriptor(capsys, rng, tmp_path, monkeypatch):
    """Resident memory stays about one block: each block's mapping is closed before the next opens,
    and every mapping comes from the one descriptor opened for the run."""
    import mmap as mmap_module

    from ptx_numba.cli import npyfile

    logits = rng.standard_normal((29, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=29)
    x, y = save(tmp_path, "x.npy", logits), save(tmp_path, "y.npy", labels)
    live, peak, fds = [0], [0], set()

    class CountingMap(mmap_module.mmap):
        def __new__(cls, fd, *args, **kwargs):
            fds.add(fd)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return super().__new__(cls, fd, *args, **kwargs)

        def close(self):
            if not self.closed:
                live[0] -= 1
            super().close()

    monkeypatch.setattr(npyfile.mmap, "mmap", CountingMap)
    result = run_json(capsys, "score", x, y, "--block-rows", "4", "--backend", "reference")
    assert result["blocks"] == 8
    assert peak[0] == 1 and live[0] == 0 and len(fds) == 1
    assert close(result["ce"], expected_loss(logits, labels, 1, 0)[2], "reference")
