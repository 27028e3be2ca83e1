"""The GPU check script: ``bench/gpu_check.sh`` parses, and ``bench/bench_cuda_gpu.py --smoke``
runs every op through the public API on the CUDA simulator and writes its CSV (no GPU needed; the
timings of a smoke run mean nothing)."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_cuda_gpu.py"
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_script_parses_and_bounds_its_time():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and "timeout 480" in text and '${OUT:-results-local}' in text
    assert "bench/bench_cuda_gpu.py" in text and "tests/test_conformance.py" in text


def test_bench_smoke_writes_every_op(tmp_path):
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    pytest.importorskip("torch", reason="the bench's inputs are torch tensors")
    out = tmp_path / "smoke.csv"
    log = tmp_path / "smoke.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-W", "error", str(BENCH), "--smoke", "--csv", str(out), "--log", str(log)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED" not in res.stdout, res.stdout
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["op", "dtype", "rows", "vocab", "contender", "ms", "gbps", "pct_of_peak_bw",
                                 "vs_torch", "rel_diff_vs_torch", "machine", "date"]
    ops = {"cross_entropy", "cross_entropy_and_grad", "token_logprobs_entropy", "kl_divergence",
           "kl_penalty_k3", "linear_cross_entropy"}
    for op in ops:
        mine = [r for r in rows if r["op"] == op and r["contender"] == "ptx_numba"]
        torch_rows = [r for r in rows if r["op"] == op and r["contender"] == "torch"]
        assert len(mine) == 1 and len(torch_rows) == 1, op
        assert float(mine[0]["ms"]) > 0 and float(torch_rows[0]["vs_torch"]) == 1.0
        # the same function as torch computes: a sanity bound far above float32 rounding
        assert float(mine[0]["rel_diff_vs_torch"]) < 1e-4, mine[0]
        assert (mine[0]["rows"], mine[0]["vocab"], mine[0]["dtype"]) == ("6", "97", "float32")
        assert "simulator" in mine[0]["machine"]
    assert {r["op"] for r in rows} == ops | {"copy"}
    assert log.read_text().count("\n") >= len(rows)
