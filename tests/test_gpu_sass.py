"""Every cuda kernel variant compiles for sm_80 and sm_90, with no spills and no float64 in the
float32/bf16/fp16 inner loops (``@pytest.mark.sass``; needs ``numba-cuda[cu13]`` and
``nvidia-cuda-nvcc``, no GPU).

The test session runs on the CUDA simulator, which generates no code, so the compiler runs once per
session in a subprocess with ``NUMBA_ENABLE_CUDASIM=0`` (``tests/gpu_sass_compile.py``) and the
tests read its JSON report. ``PTX_NUMBA_SASS_FULL=1`` adds every mixed pair of encodings and the tree reduction of every key
(see the script's docstring for what the default set leaves out and why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sass

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
nvidia = pytest.importorskip("nvidia", reason="the CUDA toolchain wheels are not installed")

SCRIPT = Path(__file__).with_name("gpu_sass_compile.py")
ROOT = SCRIPT.parent.parent


def _has_toolchain() -> bool:
    for base in nvidia.__path__:
        for sub in ("cu13/bin", "cuda_nvcc/bin", "cu12/bin"):
            if os.path.exists(os.path.join(base, sub, "ptxas")):
                return True
    return False


if not _has_toolchain():
    pytest.skip("ptxas not installed (pip install nvidia-cuda-nvcc)", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "report.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(SCRIPT), str(out)]
    if os.environ.get("PTX_NUMBA_SASS_FULL") == "1":
        args.append("--full")
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(compiled):
    return compiled["results"]


def test_every_listed_kernel_was_compiled(compiled):
    # The script compiles exactly the keys of ptx_numba.gpu.kernels.variants (every encoding,
    # transform kind, moment set and coefficient set the public ops launch), each once.
    names = [r["name"] for r in compiled["results"] if r["kind"] == "kernel"]
    assert sorted(names) == sorted(compiled["expected"])
    assert len(set(names)) == len(names)
    stats = [n for n in names if n.startswith("stats:")]
    grads = [n for n in names if n.startswith("grad:")]
    assert {n.split(":")[1].split(",")[0] for n in stats + grads} == {"f32", "f64", "f16", "bf16"}
    assert len(stats) >= 36 + 18 and len(grads) >= 28
    assert compiled["cc90"], "some kernels must also be compiled by NVVM for cc 9.0"


def test_every_kernel_assembles_without_spills(compiled, report):
    cc90 = set(compiled["cc90"])
    bad = []
    for r in (r for r in report if r["kind"] == "kernel"):
        targets = {k: v for k, v in r.items() if k.startswith("cc")}
        want = {"cc80->sm_80", "cc80->sm_90"} | ({"cc90->sm_90"} if r["name"] in cc90 else set())
        assert set(targets) == want, (r["name"], targets)
        for tag, res in targets.items():
            if not res["ok"] or res["spill_bytes"] != 0 or res["registers"] <= 0:
                bad.append((r["name"], tag, res))
    assert not bad, bad


def test_inner_loops_have_no_float64_arithmetic(report):
    loops = [r for r in report if r["kind"] == "loop"]
    assert {r["name"].split(":")[0] for r in loops} == {"scan", "grad_row"}
    assert {r["name"].split(":")[1].split(",")[0] for r in loops} == {"f32", "f16", "bf16"}
    for r in loops:
        assert r["ok"], r
        assert r["f64_ops"] == [], (r["name"], r["f64_ops"])


def test_the_float64_check_can_fail():
    # The pattern the loop check greps for does match float64 arithmetic in PTX.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
        import re

        text = SCRIPT.read_text()
        pattern = text.split("F64_OP = re.compile(", 1)[1].split(", re.M)", 1)[0]
        regex = re.compile(eval("(" + pattern + ")"), re.M)  # noqa: S307 - our own source
    finally:
        sys.path.pop(0)
    assert regex.search("\tadd.f64 \t%fd3, %fd1, %fd2;")
    assert regex.search("\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd4;")
    assert regex.search("\tcvt.f64.f32 \t%fd1, %f1;")
    assert not regex.search("\tadd.f32 \t%f3, %f1, %f2;")
    assert not regex.search("\tcvt.rn.f32.f64 \t%f1, %fd1;")
