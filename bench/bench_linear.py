"""Fused linear cross entropy on the CPU: time and peak memory against PyTorch.

    python bench/bench_linear.py [--n 2048] [--d 1024] [--vocab 128256] [--repeat 2] [--csv FILE]

Each contender runs in its own subprocess (so its RSS high-water mark is its own): the same
float32 inputs (seeded), one warm-up call, then the median of ``--repeat`` timed calls, forward and
forward+backward. Peak extra memory is the RSS high-water mark minus the RSS after the inputs were
made (it includes the gradient outputs, ``grad_outputs_mb``, which every contender holds, and the
libraries' own memory); ``*_call_peak_rss_mb`` is the RSS high-water mark of one call alone, above
the RSS just before it (after imports, compilation and warm-up); for
ptx_numba also the tracemalloc peak (NumPy allocations). The matmul share: one chunk's matmul
(``hidden[rows] @ weight.T``), its loss kernel and its gradient kernel timed alone, and the
kernels' time as a share of the matmul's (``loss_share_of_matmul``, ``grad_share_of_matmul``).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _call_peak_mb(fn) -> float | None:
    """RSS high-water mark of one call of ``fn`` above the RSS before it (Linux: the peak is reset
    through ``/proc/self/clear_refs``), so imports, compilation and earlier calls do not count."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_mb()
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return hwm / 1024 - before


def _child(which: str, n: int, d: int, vocab: int, repeat: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    h = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    w = rng.standard_normal((vocab, d)).astype(np.float32)
    y = rng.integers(0, vocab, n)
    base = _rss_mb()
    import tracemalloc

    if which.startswith("ptx"):
        import ptx_numba as pn

        def fwd():
            return pn.linear_cross_entropy(h, w, y)

        def fwd_bwd():
            return pn.linear_cross_entropy_and_grad(h, w, y)

        from ptx_numba import config

        chunk = max(1, config.LINEAR_CHUNK_BYTES // (vocab * 4))
        buf = np.empty((min(chunk, n), vocab), np.float32)

        def matmul_only():
            for s in range(0, n, chunk):
                np.matmul(h[s:s + chunk], w.T, out=buf[: min(chunk, n - s)])

        def one_chunk():
            # One chunk's matmul, its loss kernel and its gradient kernel, each timed alone.
            rows = buf.shape[0]
            times = {"chunk_matmul_ms": [], "chunk_loss_ms": [], "chunk_grad_ms": []}
            for _ in range(5):
                t0 = time.perf_counter()
                np.matmul(h[:rows], w.T, out=buf)
                t1 = time.perf_counter()
                pn.cross_entropy(buf, y[:rows], reduction="none")
                t2 = time.perf_counter()
                pn.cross_entropy_and_grad(buf, y[:rows], out=buf)
                t3 = time.perf_counter()
                for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key].append(dt)
            return {key: statistics.median(v) for key, v in times.items()}
    else:
        import torch
        import torch.nn.functional as F

        th, tw, ty = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(y)
        fused = which == "torch_linear_ce"
        opts = torch.nn.LinearCrossEntropyOptions() if fused and hasattr(torch.nn, "LinearCrossEntropyOptions") else None

        def loss(hh, ww):
            if fused:
                return F.linear_cross_entropy(hh, ww, ty, options=opts)
            return F.cross_entropy(hh @ ww.T, ty)

        def fwd():
            with torch.no_grad():
                return loss(th, tw)

        def fwd_bwd():
            hh = th.detach().requires_grad_(True)
            ww = tw.detach().requires_grad_(True)
            loss(hh, ww).backward()

        matmul_only = one_chunk = None
    out = {"contender": which}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        fn()
        tracemalloc.start()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = round(statistics.median(times), 3)
        out[f"{name}_tracemalloc_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    if matmul_only is not None:
        matmul_only()
        t0 = time.perf_counter()
        matmul_only()
        out["matmul_s"] = round(time.perf_counter() - t0, 3)
        part = one_chunk()
        out["chunk_rows"] = buf.shape[0]
        out.update({k: round(v * 1e3, 2) for k, v in part.items()})  # in ms
        out["loss_share_of_matmul"] = round(part["chunk_loss_ms"] / part["chunk_matmul_ms"], 3)
        out["grad_share_of_matmul"] = round(part["chunk_grad_ms"] / part["chunk_matmul_ms"], 3)
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        peak_mb = _call_peak_mb(fn)
        if peak_mb is not None:
            out[f"{name}_call_peak_rss_mb"] = round(peak_mb, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_extra_rss_mb"] = round(peak - base, 1)
    # The gradients (d_hidden, d_weight) are outputs, held by every contender alike.
    out["grad_outputs_mb"] = round((n * d + vocab * d) * 4 / 2**20, 1)
    out["logits_mb"] = round(n * vocab * 4 / 2**20, 1)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--csv")
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.n, args.d, args.vocab, args.repeat)))
        return 0
    rows = []
    for which in ("ptx_numba", "torch_unfused", "torch_linear_ce"):
        cmd = [sys.executable, __file__, "--child", which, "--n", str(args.n), "--d", str(args.d),
               "--vocab", str(args.vocab), "--repeat", str(args.repeat)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{which}: failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, flush=True)
    if args.csv and rows:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
