"""End-to-end tests of the ``ptx-numba`` command line (``ptx_numba.cli.main``)."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ptx_numba
from exact import ce64
from ptx_numba import _bench, _bench_report, available_backends, cli, config, ptx_loss
from ptx_numba.contract import TOL_FLOAT32

HOST_BACKENDS = [b for b in available_backends() if b != "cuda"]
# float32 kernels meet the numerics contract (TOL_FLOAT32 relative to max(1, |exact|)); the
# reference is float64 throughout and differs from an independent float64 computation only by
# summation order, so it is held to a deliberately tighter 1e-12.
TOLERANCE = {"reference": 1e-12, "cpu": TOL_FLOAT32}


def expected_loss(logits, labels, beta, rl_loss, ignore_index=-100):
    """Independent float64 NumPy PTX loss: ``(total, ptx, ce)`` with ce = 0 when no row is valid."""
    y = np.asarray(labels).reshape(-1)
    valid = y != ignore_index
    if not valid.any():
        return rl_loss, 0.0, 0.0
    rows = ce64(np.reshape(logits, (-1, np.shape(logits)[-1])), y, ignore_index)
    ce = float(np.mean(rows[valid]))
    return rl_loss + beta * ce, beta * ce, ce


def close(got, want, backend):
    return abs(got - want) <= TOLERANCE.get(backend, TOL_FLOAT32) * max(1.0, abs(want))


def save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


def run_json(capsys, *argv):
    capsys.readouterr()  # drop the rng fixture's seed line
    code = cli.main(list(argv) + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def batch(rng, tmp_path):
    """N=10, V=37 float32 logits with two ignored rows, saved as .npy files."""
    logits = (rng.standard_normal((10, 37)) * 4).astype(np.float32)
    labels = rng.integers(0, 37, size=10)
    labels[[2, 7]] = -100
    return logits, labels, save(tmp_path, "logits.npy", logits), save(tmp_path, "labels.npy", labels)


# --------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_score_in_blocks_matches_whole_array(capsys, batch, backend):
    logits, labels, logits_path, labels_path = batch
    result = run_json(capsys, "score", logits_path, labels_path, "--beta", "0.3", "--rl-loss", "1.25",
                      "--block-rows", "3", "--backend", backend)
    assert result["blocks"] == 4 and result["rows"] == 10 and result["valid_rows"] == 8
    want = expected_loss(logits, labels, 0.3, 1.25)
    whole = ptx_loss(1.25, logits, labels, 0.3, backend=backend)
    for key, exact, api_value in zip(("total", "ptx", "ce"), want, whole):
        assert close(result[key], exact, backend), (key, result[key], exact)
        assert close(result[key], api_value, backend), (key, result[key], api_value)


def test_score_default_block_size_follows_config(capsys, batch, monkeypatch):
    _, _, logits_path, labels_path = batch
    whole = run_json(capsys, "score", logits_path, labels_path, "--beta", "1", "--rl-loss", "0")
    assert whole["blocks"] == 1
    monkeypatch.setattr(config, "SCORE_BLOCK_BYTES", 4 * 37 * 4)  # four float32 rows of V=37
    blocked = run_json(capsys, "score", logits_path, labels_path, "--beta", "1", "--rl-loss", "0")
    assert blocked["blocks"] == 3
    assert close(blocked["ce"], whole["ce"], "cpu")


def test_score_text_output(capsys, batch):
    logits, labels, logits_path, labels_path = batch
    capsys.readouterr()
    code = cli.main(["score", logits_path, labels_path, "--beta", "0.5", "--rl-loss", "2",
                     "--backend", "reference"])
    out, _ = capsys.readouterr()
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    want = expected_loss(logits, labels, 0.5, 2.0)
    assert close(float(fields["total"]), want[0], "reference")
    assert close(float(fields["ce"]), want[2], "reference")
    assert fields["rows"].startswith("10 (8 valid")


@pytest.mark.parametrize("flat_labels", [False, True], ids=["labels-BT", "labels-flat"])
def test_score_three_dimensional_logits(capsys, rng, tmp_path, flat_labels):
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 5))
    labels[1, 3] = -1
    labels_path = save(tmp_path, "y.npy", labels.reshape(-1) if flat_labels else labels)
    result = run_json(capsys, "score", save(tmp_path, "x.npy", logits), labels_path, "--beta", "2",
                      "--rl-loss", "-0.5", "--ignore-index", "-1", "--block-rows", "3",
                      "--backend", "reference")
    want = expected_loss(logits, labels, 2.0, -0.5, ignore_index=-1)
    assert result["valid_rows"] == 9
    assert close(result["total"], want[0], "reference") and close(result["ce"], want[2], "reference")


def test_score_fortran_ordered_matrix(capsys, batch, tmp_path):
    logits, labels, _, labels_path = batch
    fortran_path = save(tmp_path, "xf.npy", np.asfortranarray(logits))
    result = run_json(capsys, "score", fortran_path, labels_path, "--beta", "0.3", "--rl-loss", "1",
                      "--block-rows", "4", "--backend", "reference")
    assert close(result["total"], expected_loss(logits, labels, 0.3, 1.0)[0], "reference")


def test_score_all_rows_ignored_gives_rl_loss(capsys, rng, tmp_path):
    logits = rng.standard_normal((4, 6)).astype(np.float32)
    labels_path = save(tmp_path, "y.npy", np.full(4, -100))
    result = run_json(capsys, "score", save(tmp_path, "x.npy", logits), labels_path,
                      "--beta", "0.1", "--rl-loss", "0.75", "--block-rows", "3")
    assert result == {**result, "total": 0.75, "ptx": 0.0, "ce": 0.0, "valid_rows": 0}


def test_score_bfloat16_file(capsys, rng, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    logits = rng.standard_normal((5, 9)).astype(ml_dtypes.bfloat16)
    labels = rng.integers(0, 9, size=5)
    result = run_json(capsys, "score", save(tmp_path, "x.npy", logits), save(tmp_path, "y.npy", labels),
                      "--beta", "1", "--rl-loss", "0", "--block-rows", "2", "--backend", "reference",
                      "--dtype", "bfloat16")
    want = expected_loss(logits.astype(np.float64), labels, 1.0, 0.0)
    assert close(result["ce"], want[2], "reference")


def test_score_progress_bar(capsys, batch):
    _, _, logits_path, labels_path = batch
    capsys.readouterr()
    code = cli.main(["score", logits_path, labels_path, "--beta", "1", "--rl-loss", "0", "--block-rows", "3",
                     "--progress", "--backend", "reference"])
    _, err = capsys.readouterr()
    assert code == 0
    assert "scoring" in err and "100%" in err and "10/10" in err


def test_score_subprocess(batch):
    logits, labels, logits_path, labels_path = batch
    proc = subprocess.run(
        [sys.executable, "-m", "ptx_numba.cli", "score", logits_path, labels_path, "--beta", "0.3",
         "--rl-loss", "1.25", "--block-rows", "3", "--backend", "reference", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr
    assert close(json.loads(proc.stdout)["total"], expected_loss(logits, labels, 0.3, 1.25)[0], "reference")


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ptx-numba {ptx_numba.__version__}"


# --------------------------------------------------------------------------------------------
# errors: one line on stderr, non-zero exit, no traceback
# --------------------------------------------------------------------------------------------
def _error_cases(tmp_path, rng):
    good_x = save(tmp_path, "x.npy", rng.standard_normal((4, 6)).astype(np.float32))
    good_y = save(tmp_path, "y.npy", np.array([0, 1, 2, 3]))
    npz = str(tmp_path / "a.npz")
    np.savez(npz, x=np.zeros((2, 2)))
    not_npy = tmp_path / "junk.npy"
    not_npy.write_text("definitely not an array")
    truncated = tmp_path / "truncated.npy"  # header promises 4x6 float32, data is cut short
    truncated.write_bytes((tmp_path / "x.npy").read_bytes()[:140])
    objects = str(tmp_path / "obj.npy")
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    score = lambda x, y, *extra: ["score", x, y, "--beta", "1", "--rl-loss", "0", *extra]  # noqa: E731
    return {
        "missing-logits": (score(str(tmp_path / "nope.npy"), good_y), "not found"),
        "missing-labels": (score(good_x, str(tmp_path / "nope.npy")), "not found"),
        "directory": (score(str(tmp_path), good_y), "directory"),
        "not-npy": (score(str(not_npy), good_y), "not a .npy file"),
        "truncated": (score(str(truncated), good_y), "cannot read"),
        "npz": (score(npz, good_y), ".npz"),
        "object-labels": (score(good_x, objects), "never unpickled"),
        "1d-logits": (score(good_y, good_y), "at least 2 dimensions"),
        "labels-shape": (score(good_x, save(tmp_path, "y3.npy", np.array([0, 1, 2]))), "does not match"),
        "label-range": (score(good_x, save(tmp_path, "y9.npy", np.array([0, 1, 6, 3]))), "out of range"),
        "label-float": (score(good_x, save(tmp_path, "yf.npy", np.array([0, 1.5, 2, 3]))), "integers"),
        "unknown-backend": (score(good_x, good_y, "--backend", "gpu9000"), "unknown backend"),
        "nan-beta": (["score", good_x, good_y, "--beta", "nan", "--rl-loss", "0"], "finite"),
        "rl-loss-without-beta": (["score", good_x, good_y, "--rl-loss", "0"], "--rl-loss needs --beta"),
        "missing-labels-arg": (["score", good_x], "give its labels file"),
        "block-rows-zero": (score(good_x, good_y, "--block-rows", "0"), "positive"),
        "no-command": ([], "required: {score,bench}"),
        "unknown-command": (["frobnicate"], "invalid choice"),
        "bench-dtype": (["bench", "--dtype", "float8"], "unknown dtype"),
        "bench-backend": (["bench", "--backends", "numpy"], "unknown backend"),
        "bench-threads": (["bench", "--threads", "4096"], "threads"),
        "bench-rows": (["bench", "--rows", "0"], "positive"),
    }


def test_every_error_is_one_line(capsys, rng, tmp_path):
    capsys.readouterr()
    for name, (argv, fragment) in _error_cases(tmp_path, rng).items():
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code != 0, name
        assert out == "", name
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ptx-numba: error: "), (name, err)
        assert fragment in lines[0], (name, lines[0])
        assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def test_bench_tiny_shape_writes_csv_and_plot(capsys, tmp_path):
    table_csv, png = tmp_path / "cpu.csv", tmp_path / "cpu_gbps.png"
    argv = ["bench", "--vocab", "1000", "--rows", "8", "--repeat", "1", "--csv", str(table_csv)]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    code = cli.main(argv + (["--plot", str(png)] if has_matplotlib else []))
    out, err = capsys.readouterr()
    assert code == 0, err
    contenders = _bench.all_contenders()
    for name in contenders:
        assert any(line.startswith(name) for line in out.splitlines()), name

    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == _bench_report.CSV_COLUMNS
    assert sorted(r["backend"] for r in rows) == sorted(contenders)
    for row in rows:
        assert (row["dtype"], row["N"], row["V"]) == ("float32", "8", "1000")
        assert float(row["seconds"]) > 0 and float(row["gbps"]) > 0
        if row["backend"] != _bench.STREAM_READ:
            assert float(row["max_rel_err"]) <= TOL_FLOAT32
    if has_matplotlib:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same key measured again replaces its row instead of adding one.
    assert cli.main(argv + ["--backends", "reference"]) == 0
    capsys.readouterr()
    with open(table_csv, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_every_op_checks_its_values_and_counts_its_traffic(capsys, tmp_path, dtype):
    from ptx_numba._bench_ops import OPS

    table_csv = tmp_path / "ops.csv"
    backends = "stream-read,reference,cpu" + (",torch" if _bench.torch_importable() else "")
    argv = ["bench", "--op", ",".join(OPS), "--dtype", dtype, "--vocab", "515", "--rows", "7",
            "--repeat", "1", "--backends", backends, "--csv", str(table_csv)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    item = 4 if dtype == "float32" else 2
    for name, op in OPS.items():
        mine = {r["backend"]: r for r in rows if r["op"] == name}
        assert set(mine) == set(backends.split(",")), name
        for backend, row in mine.items():
            moved = float(row["gbps"]) * 1e9 * float(row["seconds"])
            assert moved == pytest.approx(7 * 515 * item * op.traffic, rel=1e-3), (name, backend)
        assert float(mine["cpu"]["max_rel_err"]) <= TOL_FLOAT32, name
        assert float(mine["reference"]["max_rel_err"]) == 0.0
        if name != "cross_entropy":
            assert f"{name}: {dtype} logits [N=7, V=515]" in out


def test_bench_unknown_op_is_a_clear_error(capsys):
    assert cli.main(["bench", "--op", "cross_entropy,softmax", "--vocab", "10", "--rows", "1"]) != 0
    err = capsys.readouterr().err
    assert "unknown op 'softmax'" in err and "Traceback" not in err


def test_bench_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert cli.main(["bench", "--vocab", "10", "--rows", "1", "--plot", "x.png"]) != 0
    assert "needs matplotlib" in capsys.readouterr().err


def test_bench_csv_with_other_columns_is_a_clear_error_and_left_alone(capsys, tmp_path):
    foreign = tmp_path / "other.csv"
    foreign.write_text("name,value\nx,1\n")
    code = cli.main(["bench", "--vocab", "10", "--rows", "1", "--repeat", "1", "--backends", "reference",
                     "--csv", str(foreign)])
    assert code != 0
    err = capsys.readouterr().err
    assert "other.csv has columns ['name', 'value']" in err and "Traceback" not in err
    assert foreign.read_text() == "name,value\nx,1\n"


def test_bench_plot_of_no_rows_for_this_machine_is_a_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    record = dict.fromkeys(_bench_report.CSV_COLUMNS, "1")
    record["machine"] = "some other machine"
    with pytest.raises(_bench.BenchError, match="no measurements for 'this machine' to plot"):
        _bench_report.plot_gbps([record], str(tmp_path / "x.png"), "this machine")


def test_bench_times_contenders_in_interleaved_rounds():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    medians = _bench.interleaved_median_seconds(calls, repeat=3, budget_s=60.0)
    assert order == ["a", "b"] * 3  # one call of each per round, so noise hits both alike
    assert set(medians) == {"a", "b"} and all(0.0 <= s < 1.0 for s in medians.values())


def test_bench_rounds_stop_at_the_time_budget():
    order = []
    medians = _bench.interleaved_median_seconds({"a": lambda: order.append("a")}, repeat=50,
                                                budget_s=0.0)
    assert order == ["a"] and medians["a"] >= 0.0  # at least one round, then the budget ends it
