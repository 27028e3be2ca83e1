"""bfloat16 logits -> bfloat16 gradient: ptx_numba's cpu backend and PyTorch against float64.

    python bench/grad_accuracy.py

[64, 128256] normal logits (std 3) in bfloat16; eight rows get a logit of 40 at their label, so
that ``p_y`` is within about 5e-11 of 1. Prints, per contender, the largest error in bfloat16 ulps
of the float64 gradient of the mean cross entropy, the share of entries more than half an ulp off,
and the worst relative error of those eight label entries.
"""
import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

import ptx_numba as pn


def main() -> None:
    rng = np.random.default_rng(0)
    n, v = 64, 128256
    z = (rng.standard_normal((n, v)) * 3).astype(ml_dtypes.bfloat16)
    z[np.arange(8), rng.integers(0, v, 8)] = 40.0
    y = rng.integers(0, v, n)
    y[:8] = np.argmax(z[:8].astype(np.float32), 1)
    z64 = z.astype(np.float64)
    e = np.exp(z64 - z64.max(1, keepdims=True))
    g64 = e / e.sum(1, keepdims=True)
    g64[np.arange(n), y] -= 1
    g64 /= n
    live = np.abs(g64) > 1e-30
    ulp = 2.0 ** (np.floor(np.log2(np.abs(g64[live]))) - 7)  # bfloat16: 8 significant bits

    _, ours = pn.cross_entropy_and_grad(z, y, backend="cpu")
    t = torch.from_numpy(z.view(np.int16)).view(torch.bfloat16).requires_grad_(True)
    F.cross_entropy(t, torch.from_numpy(y)).backward()
    theirs = t.grad.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    rows = np.arange(8)
    for name, g in (("ptx_numba cpu", ours), ("torch", theirs)):
        g = g.astype(np.float64)
        u = np.abs(g[live] - g64[live]) / ulp
        label = np.abs(g[rows, y[:8]] - g64[rows, y[:8]]) / np.abs(g64[rows, y[:8]])
        print(f"{name:14s} max {u.max():8.2f} bf16 ulps, {100 * np.mean(u > 0.5):7.3f}% beyond half an ulp, "
              f"label entries with p_y ~ 1: max rel err {label.max():.3g}")


if __name__ == "__main__":
    main()
