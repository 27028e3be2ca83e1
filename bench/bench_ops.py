"""Every op side by side on the CPU: ptx_numba's cpu backend, PyTorch (CPU) and the memory floor.

    python bench/bench_ops.py [--rows 512] [--vocab 128256] [--repeat 10] [--ops ce,ce_grad,...] [--stat min]
                              [--dtypes float32,bfloat16] [--csv docs/results/cpu_ops.csv]

Method: one process; after a warm-up call each, the contenders of one case are timed in
interleaved rounds (one call of each per round) and each reports its median. The floor is the
streaming read of the bytes the op must touch (``ptx_numba._bench_floor.stream_read`` on the
logits; on both logit sets for KL; read + copy for forward+backward, which reads the logits twice
at most and writes the gradient once). GB/s counts those bytes. Only public APIs are called.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import numpy as np

import ptx_numba as pn

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the bench runs without torch, with fewer contenders
    torch = None


def _floor():
    from ptx_numba._bench_floor import stream_read

    return stream_read


def _machine() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def _inputs(rows, vocab, dtype, rng):
    z = rng.normal(0.0, 2.0, (rows, vocab)).astype(np.float32)
    w = z + rng.normal(0.0, 0.5, (rows, vocab)).astype(np.float32)
    y = rng.integers(0, vocab, rows)
    if dtype == "bfloat16":
        import ml_dtypes

        return z.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16), y
    return z.astype(dtype), w.astype(dtype), y


def _torch(a):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def contenders(op, z, w, y):
    """``{name: callable}`` and the floor's byte multiplier for one op."""
    floor = _floor()
    out = np.empty_like(z)
    calls = {}
    if op == "ce":
        calls["floor"] = lambda: floor(z)
        calls["cpu"] = lambda: pn.cross_entropy(z, y, reduction="none", backend="cpu")
        if torch is not None:
            tz, ty = _torch(z), torch.from_numpy(y)
            calls["torch"] = lambda: F.cross_entropy(tz.float() if tz.dtype == torch.float16 else tz, ty,
                                                     reduction="none")
        return calls, 1
    if op == "ce_grad":
        calls["floor"] = lambda: (floor(z), np.copyto(out, z))
        calls["cpu"] = lambda: pn.cross_entropy_and_grad(z, y, out=out, backend="cpu")
        if torch is not None:
            ty = torch.from_numpy(y)

            def torch_fb():
                t = _torch(z).detach().requires_grad_(True)
                F.cross_entropy(t, ty).backward()
                return t.grad
            calls["torch"] = torch_fb
        return calls, 3
    if op == "logprobs_entropy":
        calls["floor"] = lambda: floor(z)
        calls["cpu_ce"] = lambda: pn.cross_entropy(z, y, reduction="none", backend="cpu")
        calls["cpu"] = lambda: pn.token_logprobs(z, y, return_entropy=True, backend="cpu")
        if torch is not None:
            tz, ty = _torch(z), torch.from_numpy(y)

            def torch_lp():
                lp = torch.log_softmax(tz.float() if tz.dtype != torch.float64 else tz, -1)
                return lp.gather(-1, ty[:, None]), -(lp.exp() * lp).sum(-1)
            calls["torch"] = torch_lp
        return calls, 1
    if op in ("kl", "kl_k3"):
        calls["floor"] = lambda: (floor(z), floor(w))
        if op == "kl":
            calls["cpu"] = lambda: pn.kl_divergence(z, w, backend="cpu")
        else:
            calls["cpu"] = lambda: pn.kl_penalty(z, w, y, estimator="k3", backend="cpu")
        if torch is not None:
            tz, tw, ty = _torch(z), _torch(w), torch.from_numpy(y)

            def torch_kl():
                lp = torch.log_softmax(tz.float() if tz.dtype != torch.float64 else tz, -1)
                lq = torch.log_softmax(tw.float() if tw.dtype != torch.float64 else tw, -1)
                if op == "kl":
                    return (lp.exp() * (lp - lq)).sum(-1)
                r = (lp - lq).gather(-1, ty[:, None])
                return torch.expm1(-r) + r
            calls["torch"] = torch_kl
        return calls, 2
    raise ValueError(f"unknown op {op!r}")


def time_case(calls, repeat, stat="median"):
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    pick = min if stat == "min" else statistics.median
    return {name: pick(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--ops", default="ce,ce_grad,logprobs_entropy,kl,kl_k3")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per contender: the median of the rounds, or the fastest (on a shared machine)")
    args = parser.parse_args(argv)
    import numba

    machine = _machine()
    rng = np.random.default_rng(args.seed)
    rows_out = []
    print(f"# {args.stat} of {args.repeat} interleaved rounds; load {os.getloadavg()[0]:.1f}; {machine}, numba {numba.__version__} ({numba.get_num_threads()} threads), torch "
          f"{torch.__version__ if torch else 'absent'}, [N={args.rows}, V={args.vocab}]")
    for dtype in args.dtypes.split(","):
        z, w, y = _inputs(args.rows, args.vocab, dtype, rng)
        for op in args.ops.split(","):
            calls, mult = contenders(op, z, w, y)
            t = time_case(calls, args.repeat, args.stat)
            nbytes = z.nbytes * mult
            for name, sec in t.items():
                rows_out.append({"op": op, "dtype": dtype, "rows": args.rows, "vocab": args.vocab,
                                 "contender": name, "ms": round(sec * 1e3, 3),
                                 "gbps": round(nbytes / sec / 1e9, 2),
                                 "pct_floor": round(100 * t["floor"] / sec, 1),
                                 "vs_torch": round(t["torch"] / sec, 2) if "torch" in t else "",
                                 "threads": numba.get_num_threads(), "machine": machine,
                                 "date": time.strftime("%Y-%m-%d")})
                print(f"{op:17s} {dtype:9s} {name:7s} {sec * 1e3:9.2f} ms {nbytes / sec / 1e9:7.2f} GB/s "
                      f"{100 * t['floor'] / sec:6.1f}% floor"
                      + (f" {t['torch'] / sec:6.2f}x torch" if "torch" in t else ""), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            writer.writeheader()
            writer.writerows(rows_out)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
