"""``ptx-numba score --hidden H.npy --weight W.npy LABELS.npy``: hidden states through the LM head."""
import json

import numpy as np
import pytest

from exact import ce64
from ptx_numba.cli import main
from ptx_numba.contract import TOL_FLOAT32


def _exact_mean_ce(h, w, b, y, ignore=-100):
    """Mean float64 CE of the logits ``h @ w.T + b`` (formed in float64) and the token count."""
    z = h.reshape(-1, h.shape[-1]).astype(np.float64) @ w.astype(np.float64).T + b
    y = y.reshape(-1)
    keep = y != ignore
    return ce64(z[keep], y[keep]).mean() if keep.any() else 0.0, int(keep.sum())


@pytest.mark.parametrize("block_rows", [None, 3])
def test_score_hidden_matches_float64(tmp_path, rng, capsys, block_rows):
    h = rng.normal(size=(2, 7, 16)).astype(np.float32)
    w = rng.normal(size=(101, 16)).astype(np.float32)
    b = rng.normal(size=101).astype(np.float32)
    y = rng.integers(0, 101, size=(2, 7))
    y[0, :3] = -100
    for name, arr in (("h", h), ("w", w), ("b", b), ("y", y)):
        np.save(tmp_path / f"{name}.npy", arr)
    args = ["score", "--hidden", str(tmp_path / "h.npy"), "--weight", str(tmp_path / "w.npy"),
            "--bias", str(tmp_path / "b.npy"), str(tmp_path / "y.npy"), "--beta", "0.5", "--json"]
    if block_rows:
        args += ["--block-rows", str(block_rows)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    want, tokens = _exact_mean_ce(h, w, b, y)
    assert abs(out["ce"] - want) <= TOL_FLOAT32 * max(1.0, abs(want))
    assert out["tokens"] == tokens and out["rows"] == 14
    assert abs(out["total"] - 0.5 * out["ce"]) <= 1e-12 and out["finite"] is True


def test_score_hidden_bad_input(tmp_path, rng, capsys):
    np.save(tmp_path / "h.npy", rng.normal(size=(4, 8)).astype(np.float32))
    np.save(tmp_path / "w.npy", rng.normal(size=(10, 9)).astype(np.float32))  # D mismatch
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    assert main(["score", "--hidden", str(tmp_path / "h.npy"), "--weight", str(tmp_path / "w.npy"),
                 str(tmp_path / "y.npy")]) == 1
    assert "does not match weight shape" in capsys.readouterr().err
    assert main(["score", "--hidden", str(tmp_path / "h.npy"), str(tmp_path / "y.npy")]) == 1
    assert "--hidden and --weight go together" in capsys.readouterr().err
    assert main(["score", "--hidden", str(tmp_path / "h.npy"), "--weight", str(tmp_path / "w.npy"),
                 str(tmp_path / "y.npy"), "--checkpoint", str(tmp_path / "c.json")]) == 1
    assert "--checkpoint is not available with --hidden" in capsys.readouterr().err
