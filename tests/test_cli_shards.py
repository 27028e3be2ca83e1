"""``ptx-numba score`` on datasets of shards: discovery, bounded per-shard scoring, ``--checkpoint``
(atomic, resumable, refuses other datasets), ``--per-row`` across shards, and bad shard sets."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ptx_numba as pn
from ptx_numba import cli
from exact import ce64
from test_cli import close, expected_loss, run_json
from test_cli_inputs import run_err


def make_shards(rng, directory, sizes=(5, 9, 1, 7), vocab=23, ignored=True, dtype=np.float32):
    """Shards ``logits-<k>.npy``/``labels-<k>.npy``; returns the concatenated logits and labels."""
    os.makedirs(directory, exist_ok=True)
    xs, ys = [], []
    for k, n in enumerate(sizes):
        x = (rng.standard_normal((n, vocab)) * 3 + rng.uniform(-50, 50)).astype(dtype)
        y = rng.integers(0, vocab, size=n)
        if ignored and n > 2:
            y[1] = -100
        np.save(os.path.join(directory, f"logits-{k}.npy"), x)
        np.save(os.path.join(directory, f"labels-{k}.npy"), y)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def shards(rng, tmp_path):
    d = str(tmp_path / "data")
    logits, labels = make_shards(rng, d)
    return d, logits, labels


def test_directory_of_shards_matches_the_concatenation(capsys, shards):
    d, logits, labels = shards
    result = run_json(capsys, "score", d, "--beta", "0.2", "--rl-loss", "1", "--block-rows", "4",
                      "--backend", "reference")
    want = expected_loss(logits, labels, 0.2, 1.0)
    assert result["shards"] == 4 and result["rows"] == 22 and result["tokens"] == int((labels != -100).sum())
    assert close(result["ce"], want[2], "reference") and close(result["total"], want[0], "reference")


def test_natural_order_and_glob(capsys, rng, tmp_path):
    d = str(tmp_path / "g")
    logits, labels = make_shards(rng, d, sizes=[3] * 11, vocab=5)
    out = str(tmp_path / "rows.npy")
    result = run_json(capsys, "score", os.path.join(d, "logits-*.npy"), "--per-row", out, "--backend",
                      "reference")
    assert result["shards"] == 11
    want = ce64(logits, labels)
    # natural order: logits-2 before logits-10, so rows come back in shard-number order
    np.testing.assert_allclose(np.load(out), want, rtol=1e-6, atol=1e-6)


def test_bounded_blocks_per_shard(capsys, shards):
    d, logits, labels = shards
    result = run_json(capsys, "score", d, "--block-rows", "2", "--backend", "reference")
    assert result["blocks"] == sum(-(-n // 2) for n in (5, 9, 1, 7))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in pn.available_backends()])
def test_checkpoint_resume_is_identical_and_skips_finished(capsys, shards, tmp_path, backend):
    d, logits, labels = shards
    ckpt = str(tmp_path / "run.ckpt")
    first = run_json(capsys, "score", d, "--checkpoint", ckpt, "--backend", backend)
    saved = read_json(ckpt)
    assert sorted(saved["shards"]) == [f"logits-{k}.npy" for k in range(4)]
    again = run_json(capsys, "score", d, "--checkpoint", ckpt, "--backend", backend)
    assert again["shards_scored"] == 0 and again["ce"] == first["ce"]  # bit-identical
    # a changed shard (size/mtime) is rescored, the others are not
    x = np.load(os.path.join(d, "logits-2.npy"))
    np.save(os.path.join(d, "logits-2.npy"), x + 1)
    os.utime(os.path.join(d, "logits-2.npy"), ns=(1, 1))
    changed = run_json(capsys, "score", d, "--checkpoint", ckpt, "--backend", backend)
    assert changed["shards_scored"] == 1  # shifting logits leaves CE alone: the result is the same
    assert close(changed["ce"], first["ce"], "cpu")


def test_killed_run_resumes_to_the_identical_result(capsys, rng, tmp_path):
    d = str(tmp_path / "k")
    make_shards(rng, d, sizes=[6] * 6, vocab=17)
    clean = run_json(capsys, "score", d, "--backend", "reference")
    ckpt = str(tmp_path / "k.ckpt")
    script = textwrap.dedent(f"""
        import sys, time
        from ptx_numba.cli import run
        real = run.score_shard
        def slow(*args, **kwargs):
            out = real(*args, **kwargs)
            time.sleep(0.5)
            return out
        run.score_shard = slow
        from ptx_numba import cli
        sys.exit(cli.main(["score", {d!r}, "--checkpoint", {ckpt!r}, "--backend", "reference"]))
    """)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(ckpt) and len(read_json(ckpt)["shards"]) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err_path.read_text()
    done = len(read_json(ckpt)["shards"])
    assert 2 <= done < 6
    resumed = run_json(capsys, "score", d, "--checkpoint", ckpt, "--backend", "reference")
    assert resumed["shards_scored"] == 6 - done
    assert resumed["ce"] == clean["ce"] and resumed["tokens"] == clean["tokens"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left behind


def test_checkpoint_of_another_dataset_or_settings_is_refused(capsys, rng, shards, tmp_path):
    d, _, _ = shards
    ckpt = str(tmp_path / "a.ckpt")
    run_json(capsys, "score", d, "--checkpoint", ckpt, "--backend", "reference")
    other = str(tmp_path / "other")
    make_shards(rng, other, sizes=(2, 2))
    assert "another dataset" in run_err(capsys, "score", other, "--checkpoint", ckpt, "--backend", "reference")
    line = run_err(capsys, "score", d, "--checkpoint", ckpt, "--backend", "reference", "--ignore-index", "-1")
    assert "other settings" in line and "ignore_index" in line
    bad = tmp_path / "bad.ckpt"
    bad.write_text("{not json")
    assert "cannot read checkpoint" in run_err(capsys, "score", d, "--checkpoint", str(bad))


def test_corrupt_shard_in_the_middle_fails_by_name_and_keeps_the_checkpoint(capsys, shards, tmp_path):
    d, _, _ = shards
    np.save(os.path.join(d, "labels-2.npy"), np.array([99]))  # out of range for V=23
    ckpt = str(tmp_path / "c.ckpt")
    line = run_err(capsys, "score", d, "--checkpoint", ckpt, "--backend", "reference")
    assert "logits-2.npy" in line and "out of range" in line
    assert sorted(read_json(ckpt)["shards"]) == ["logits-0.npy", "logits-1.npy"]


@pytest.mark.parametrize("case, fragment", [
    ("missing-labels", "missing labels-1.npy"),
    ("orphan-labels", "label files without logits"),
    ("different-vocab", "has V=4"),
    ("corrupt-header", "corrupt .npy header"),
    ("object-dtype", "never unpickled"),
    ("empty-dir", "no logits-*.npy shards"),
    ("glob-other-files", "not named logits-<key>.npy"),
    ("labels-beside-dataset", "give no labels file"),
])
def test_bad_shard_sets(capsys, rng, tmp_path, case, fragment):
    d = str(tmp_path / "bad")
    make_shards(rng, d, sizes=(3, 3, 3), vocab=6)
    source, extra = d, []
    if case == "missing-labels":
        os.remove(os.path.join(d, "labels-1.npy"))
    elif case == "orphan-labels":
        np.save(os.path.join(d, "labels-7.npy"), np.zeros(3, int))
    elif case == "different-vocab":
        np.save(os.path.join(d, "logits-1.npy"), np.zeros((3, 4), np.float32))
    elif case == "corrupt-header":
        with open(os.path.join(d, "logits-1.npy"), "r+b") as f:
            f.seek(12)
            f.write(b"((((((")
    elif case == "object-dtype":
        np.save(os.path.join(d, "logits-1.npy"), np.array([[None] * 6] * 3, dtype=object), allow_pickle=True)
    elif case == "empty-dir":
        source = str(tmp_path / "empty")
        os.makedirs(source)
    elif case == "glob-other-files":
        source = os.path.join(d, "*.npy")
    elif case == "labels-beside-dataset":
        extra = [os.path.join(d, "labels-0.npy")]
    line = run_err(capsys, "score", source, *extra, "--backend", "reference")
    assert fragment in line, line
    if case in ("corrupt-header", "object-dtype", "different-vocab"):
        assert "logits-1.npy" in line


def test_per_row_resume_keeps_finished_rows(capsys, shards, tmp_path):
    d, logits, labels = shards
    ckpt, out = str(tmp_path / "p.ckpt"), str(tmp_path / "rows.npy")
    run_json(capsys, "score", d, "--checkpoint", ckpt, "--per-row", out, "--backend", "reference")
    full = np.load(out).copy()
    again = run_json(capsys, "score", d, "--checkpoint", ckpt, "--per-row", out, "--backend", "reference")
    assert again["shards_scored"] == 0
    np.testing.assert_array_equal(np.load(out), full)
    os.remove(out)  # the rows are gone: every shard is scored again to rebuild them
    rebuilt = run_json(capsys, "score", d, "--checkpoint", ckpt, "--per-row", out, "--backend", "reference")
    assert rebuilt["shards_scored"] == 4
    np.testing.assert_array_equal(np.load(out), full)


def test_unreachable_scheduler_is_a_clear_error_within_the_timeout(capsys, shards):
    pytest.importorskip("distributed")
    d, _, _ = shards
    start = time.monotonic()
    line = run_err(capsys, "score", d, "--scheduler", "tcp://127.0.0.1:1", "--scheduler-timeout", "2")
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in line
    assert time.monotonic() - start < 30


def test_main_module_runs(shards):
    d, _, _ = shards
    proc = subprocess.run([sys.executable, "-m", "ptx_numba.cli", "score", d, "--json", "--backend", "reference"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shards"] == 4
    assert cli.main is not None


# --------------------------------------------------------------------------------------------
# Zarr stores: one shard per chunk of rows
# --------------------------------------------------------------------------------------------
def make_zarr(rng, path, rows=23, vocab=19, chunk=5, batch=()):
    zarr = pytest.importorskip("zarr")
    x = (rng.standard_normal((rows,) + batch + (vocab,)) * 3).astype(np.float32)
    y = rng.integers(0, vocab, size=(rows,) + batch)
    y.reshape(-1)[3] = -100
    group = zarr.open_group(path, mode="w")
    # Group.zeros(name=...) is spelled the same in zarr 2 and 3
    group.zeros(name="logits", shape=x.shape, chunks=(chunk,) + x.shape[1:], dtype=x.dtype)[...] = x
    group.zeros(name="labels", shape=y.shape, chunks=(chunk,) + y.shape[1:], dtype=y.dtype)[...] = y
    return x, y


@pytest.mark.parametrize("batch", [(), (3,)])
def test_zarr_store_scored_by_row_chunks(capsys, rng, tmp_path, batch):
    store = str(tmp_path / "d.zarr")
    x, y = make_zarr(rng, store, batch=batch)
    out = str(tmp_path / "rows.npy")
    result = run_json(capsys, "score", store, "--block-rows", "2", "--per-row", out, "--backend", "reference")
    assert result["shards"] == 5 and result["rows"] == y.size
    assert close(result["ce"], expected_loss(x, y, 1, 0)[2], "cpu")
    want = ce64(x.reshape(-1, x.shape[-1]), y.reshape(-1))
    np.testing.assert_allclose(np.load(out), want, rtol=1e-6, atol=1e-6)


def test_zarr_checkpoint_resume(capsys, rng, tmp_path):
    store, ckpt = str(tmp_path / "d.zarr"), str(tmp_path / "z.ckpt")
    make_zarr(rng, store)
    first = run_json(capsys, "score", store, "--checkpoint", ckpt, "--backend", "reference")
    again = run_json(capsys, "score", store, "--checkpoint", ckpt, "--backend", "reference")
    assert first["shards_scored"] == 5 and again["shards_scored"] == 0 and again["ce"] == first["ce"]


def test_zarr_store_without_labels_is_a_clear_error(capsys, rng, tmp_path):
    zarr = pytest.importorskip("zarr")
    store = str(tmp_path / "bad.zarr")
    zarr.open_group(store, mode="w").zeros(name="logits", shape=(4, 3), dtype="f4")
    assert "needs arrays 'logits' and 'labels'" in run_err(capsys, "score", store)
