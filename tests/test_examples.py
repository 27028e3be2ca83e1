"""The examples in examples/ and the code blocks of the README and the user guide run as shown.

Each runs in a fresh interpreter (as a user would run it), on small inputs. Pages and examples
that need PyTorch or API not importable here are skipped, naming what is missing.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from exact import ce64
from ptx_numba.contract import TOL_FLOAT32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds; each run takes a few seconds once Numba's cache is warm


def run_python(args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def missing(requirements):
    """The first of ``module`` or ``module:name`` requirements that is not importable, or None."""
    for req in requirements:
        module_name, _, attr = req.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return module_name
        if attr and not hasattr(module, attr):
            return req
    return None


def test_score_shards_matches_float64_on_a_folder(tmp_path, rng):
    total, count = 0.0, 0
    for k, rows in enumerate((37, 1, 130)):  # shards of different sizes, one of a single row
        logits = (3 * rng.standard_normal((rows, 777)) + rng.uniform(-3e4, 3e4)).astype(np.float32)
        labels = rng.integers(0, 777, size=rows)
        labels[rng.random(rows) < 0.3] = -100
        np.save(tmp_path / f"logits-{k}.npy", logits)
        np.save(tmp_path / f"labels-{k}.npy", labels)
        valid = labels != -100
        total += ce64(logits[valid], labels[valid]).sum()
        count += int(valid.sum())
    out = run_python(["examples/score_shards.py", str(tmp_path), "--block-rows", "16"])
    last = re.search(r"all shards: (\d+) tokens, mean CE ([0-9.]+)", out)
    assert last, out
    assert int(last.group(1)) == count
    # the contract, plus 1e-6 for the six decimals the example prints
    assert abs(float(last.group(2)) - total / count) <= TOL_FLOAT32 * max(1.0, total / count) + 1e-6


def test_score_shards_without_a_folder_makes_its_own():
    out = run_python(["examples/score_shards.py"])
    assert out.count("mean CE") == 4, out  # three shards and the total


def test_score_shards_names_a_shard_without_labels(tmp_path):
    np.save(tmp_path / "logits-a.npy", np.zeros((2, 3), dtype=np.float32))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "examples/score_shards.py", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0 and "labels-a.npy" in proc.stderr


def test_compare_backends_times_every_backend_and_agrees():
    import ptx_numba as pn

    out = run_python(["examples/compare_backends.py", "--rows", "5", "--vocab", "1001",
                      "--repeat", "2"])
    for backend in pn.available_backends():
        line = re.search(rf"^{backend}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.e+-]+)$", out, re.M)
        assert line, out
        assert float(line.group(3)) <= TOL_FLOAT32  # float32 contract against the float64 reference


def test_ppo_ptx_step_runs_or_says_why_not():
    pytest.importorskip("torch")
    out = run_python(["examples/ppo_ptx_step.py"])
    if out.startswith("skipped:"):
        pytest.skip(out.strip())
    assert "ok: total = rl_loss + beta * ce, and the policy was updated" in out


# --- code blocks of the README's API section and of the documentation pages -----------------

#: Pages whose ```python blocks run in order in one interpreter, with what they need.
PAGES = {
    "README.md#API": [],
    "README.md#Training with torch": ["torch", "ptx_numba.torch:PTXLoss"],
    "docs/index.md": [],
    "docs/getting-started.md": [],
    "docs/guide/scoring.md": ["ml_dtypes"],
    "docs/guide/training.md": ["torch", "ptx_numba.torch:PTXLoss", "ptx_numba:cross_entropy_and_grad"],
    "docs/guide/logprobs-and-kl.md": ["torch", "ptx_numba:token_logprobs", "ptx_numba:kl_penalty",
                                      "ptx_numba.torch:kl_penalty", "ptx_numba.rlhf:ppo_clip_loss"],
    "docs/guide/linear-cross-entropy.md": ["torch", "ptx_numba:linear_cross_entropy",
                                           "ptx_numba.torch:linear_cross_entropy"],
}


def code_blocks(page):
    path, _, section = page.partition("#")
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    if section:  # only the blocks under "## <section>"
        text = re.split(rf"^## {re.escape(section)}\s*$", text, flags=re.M)[1]
        text = re.split(r"^## ", text, flags=re.M)[0]
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_code_runs_as_shown(page, tmp_path):
    absent = missing(PAGES[page])
    if absent:
        pytest.skip(f"{page} needs {absent}")
    blocks = code_blocks(page)
    assert blocks, f"no python blocks in {page}"
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    run_python(["-W", "error", str(script)], cwd=str(tmp_path))
