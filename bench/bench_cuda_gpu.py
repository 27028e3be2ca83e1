#!/usr/bin/env python
"""Every op of ptx_numba on a real GPU against PyTorch (and Liger-Kernel where it imports).

Run on a CUDA machine (H100/H200 class), through the public API only::

    python bench/bench_cuda_gpu.py --csv results/cuda_bench.csv --log results/cuda_bench.log
    python bench/bench_cuda_gpu.py --smoke --csv /tmp/smoke.csv   # CUDA simulator, tiny shape

Ops, each on the same GPU tensors for every contender (``ptx_numba`` gets torch CUDA tensors, as a
training loop would pass them):

============================  =================================================================
``cross_entropy``             forward, mean over rows (torch: ``F.cross_entropy``)
``cross_entropy_and_grad``    forward + gradient into a preallocated device buffer (torch: the
                              forward and ``backward()`` through autograd)
``token_logprobs_entropy``    log-prob of each token and the entropy per row, one pass (torch:
                              ``log_softmax`` + ``gather`` + the entropy sum)
``kl_divergence``             exact KL per row between two logit sets (torch: two
                              ``log_softmax`` and the sum)
``kl_penalty_k3``             the k3 estimator per token (torch: two ``log_softmax``, gathers)
``linear_cross_entropy``      ``ptx_numba.torch.linear_cross_entropy`` forward + backward from
                              hidden states ``[N, D]`` and an LM head ``[V, D]`` (torch:
                              ``F.cross_entropy(h @ W.T, y)`` forward + backward)
``copy``                      a device-to-device copy of the logits, the bandwidth ceiling
============================  =================================================================

Timing: each call is followed by a device synchronize and timed with ``perf_counter`` (so the
public call's host work, validation and the float64 finish included); the median of
``--repeats`` calls after ``--warmup`` calls. ``gbps`` counts the fewest bytes the op must move
(each logit set read once; the gradient written once; the copy reads and writes), over the
median time; ``pct_of_peak_bw`` compares it with ``--peak-gbps`` (the H200 datasheet's 4800 GB/s
by default); ``vs_torch`` is torch's time over the contender's (above 1: faster than torch);
``rel_diff_vs_torch`` the largest relative difference of the result from torch's (a sanity check,
not the accuracy contract, which the tests hold against float64).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time

COLUMNS = ("op", "dtype", "rows", "vocab", "contender", "ms", "gbps", "pct_of_peak_bw", "vs_torch",
           "rel_diff_vs_torch", "machine", "date")
OPS = ("copy", "cross_entropy", "cross_entropy_and_grad", "token_logprobs_entropy", "kl_divergence",
       "kl_penalty_k3", "linear_cross_entropy")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x128256,16384x128256", help="ROWSxVOCAB,...")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--hidden-dim", type=int, default=2048, help="D of linear_cross_entropy")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--peak-gbps", type=float, default=4800.0)
    ap.add_argument("--csv", default="cuda_bench.csv")
    ap.add_argument("--log", default=None, help="also write the printed lines here")
    ap.add_argument("--machine", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="run on the CUDA simulator with a tiny shape (checks the script, times nothing real)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.dtypes, args.warmup, args.repeats = "6x97", "float32", 0, 1
        args.hidden_dim = 8
    return args


ARGS = parse(sys.argv[1:])
if ARGS.smoke:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
    os.environ["PTX_NUMBA_CUDA_TPB"] = "32"  # the simulator runs a Python thread per GPU thread
elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    sys.exit("bench_cuda_gpu.py times a real GPU; unset NUMBA_ENABLE_CUDASIM (or pass --smoke)")

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import ptx_numba as pn  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the bench needs torch for its inputs
    sys.exit("bench_cuda_gpu.py needs torch (its tensors are the inputs of every contender)")

try:
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
except Exception:  # not installed (or no Triton): those rows are skipped
    LigerCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss = None

ON_GPU = not ARGS.smoke and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
LINES: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()
    cuda.synchronize()


def median_ms(fn, setup=None) -> float:
    """Median wall time of ``fn()`` (ms), each call synchronized; ``setup()`` runs untimed first."""
    for _ in range(ARGS.warmup):
        if setup:
            setup()
        fn()
    sync()
    times = []
    for _ in range(ARGS.repeats):
        if setup:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def host(x) -> np.ndarray:
    """Any result (float, device array, tensor) as float64 NumPy."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    if hasattr(x, "copy_to_host"):
        return np.asarray(x.copy_to_host(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def rel_diff(got, want) -> float:
    g, w = host(got), host(want)
    with np.errstate(invalid="ignore"):
        return float(np.max(np.abs(g - w) / np.maximum(1.0, np.abs(w)), initial=0.0))


def logits_input(t: torch.Tensor):
    """What ptx_numba gets: the CUDA tensor itself, or on the simulator a numba device array."""
    if ON_GPU:
        return t
    if t.dtype == torch.bfloat16:
        return cuda.to_device(t.view(torch.int16).numpy().view(np.uint16))
    return cuda.to_device(t.numpy())


def contenders(op: str, z: torch.Tensor, r: torch.Tensor, y: torch.Tensor, dim: int):
    """``[(name, fn, result_fn, setup)]`` for one op; ``result_fn()`` gives the value to compare."""
    zi, ri = logits_input(z), logits_input(r)
    yi = y if ON_GPU else y.numpy()
    out = {}
    if op == "copy":
        buf = torch.empty_like(z)
        return [("torch", lambda: buf.copy_(z), None, None)]
    if op == "cross_entropy":
        run_p = lambda: out.__setitem__("p", pn.cross_entropy(zi, yi))  # noqa: E731
        run_t = lambda: out.__setitem__("t", F.cross_entropy(z, y))  # noqa: E731
        rows = [("ptx_numba", run_p, lambda: out["p"], None), ("torch", run_t, lambda: out["t"], None)]
        if LigerCrossEntropyLoss is not None and ON_GPU:
            liger = LigerCrossEntropyLoss()
            clone = {}
            rows.append(("liger", lambda: out.__setitem__("l", liger(clone["z"], y)), lambda: out["l"],
                         lambda: clone.__setitem__("z", z.clone())))  # its forward writes into z
        return rows
    if op == "cross_entropy_and_grad":
        g = cuda.device_array(zi.shape, dtype=zi.dtype) if not ON_GPU else torch.empty_like(z)
        run_p = lambda: out.__setitem__("p", pn.cross_entropy_and_grad(zi, yi, out=g)[1])  # noqa: E731
        leaf = {}

        def run_t():
            x = leaf["x"]
            F.cross_entropy(x, y).backward()
            out["t"] = x.grad

        def fresh():
            leaf["x"] = z.detach().clone().requires_grad_()

        rows = [("ptx_numba", run_p, lambda: out["p"], None), ("torch", run_t, lambda: out["t"], fresh)]
        if LigerCrossEntropyLoss is not None and ON_GPU:
            liger = LigerCrossEntropyLoss()

            def run_l():
                x = leaf["x"]
                liger(x, y).backward()
                out["l"] = x.grad

            rows.append(("liger", run_l, lambda: out["l"], fresh))
        return rows
    if op == "token_logprobs_entropy":
        def run_t():
            lp = F.log_softmax(z.float(), dim=-1)
            out["t"] = torch.where(y >= 0, lp.gather(-1, y.clamp_min(0)[:, None])[:, 0], 0.0)
            out["te"] = -(lp.exp() * lp).sum(-1)

        run_p = lambda: out.__setitem__("p", pn.token_logprobs(zi, yi, return_entropy=True)[0])  # noqa: E731
        return [("ptx_numba", run_p, lambda: out["p"], None), ("torch", run_t, lambda: out["t"], None)]
    if op == "kl_divergence":
        def run_t():
            lp, lq = F.log_softmax(z.float(), dim=-1), F.log_softmax(r.float(), dim=-1)
            out["t"] = (lp.exp() * (lp - lq)).sum(-1)

        run_p = lambda: out.__setitem__("p", pn.kl_divergence(zi, ri))  # noqa: E731
        return [("ptx_numba", run_p, lambda: out["p"], None), ("torch", run_t, lambda: out["t"], None)]
    if op == "kl_penalty_k3":
        def run_t():
            yc = y.clamp_min(0)[:, None]
            lp = F.log_softmax(z.float(), dim=-1).gather(-1, yc)[:, 0]
            lq = F.log_softmax(r.float(), dim=-1).gather(-1, yc)[:, 0]
            d = lp - lq
            out["t"] = torch.where(y >= 0, torch.exp(-d) - 1.0 + d, 0.0)

        run_p = lambda: out.__setitem__("p", pn.kl_penalty(zi, ri, yi, estimator="k3"))  # noqa: E731
        return [("ptx_numba", run_p, lambda: out["p"], None), ("torch", run_t, lambda: out["t"], None)]
    if op == "linear_cross_entropy":
        import ptx_numba.torch as pnt

        n, vocab = z.shape
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        h0 = torch.randn(n, dim, device=DEVICE, generator=gen).to(z.dtype)
        w0 = (torch.randn(vocab, dim, device=DEVICE, generator=gen) * dim ** -0.5).to(z.dtype)
        leaf = {}

        def fresh():
            leaf["h"], leaf["w"] = h0.clone().requires_grad_(), w0.clone().requires_grad_()

        def run_p():
            h, w = leaf["h"], leaf["w"]
            kw = {} if ON_GPU else {"backend": "cuda"}
            pnt.linear_cross_entropy(h, w, y, **kw).backward()
            out["p"] = h.grad

        def run_t():
            h, w = leaf["h"], leaf["w"]
            F.cross_entropy((h @ w.T).float(), y).backward()
            out["t"] = h.grad

        rows = [("ptx_numba", run_p, lambda: out["p"], fresh), ("torch", run_t, lambda: out["t"], fresh)]
        if LigerFusedLinearCrossEntropyLoss is not None and ON_GPU:
            liger = LigerFusedLinearCrossEntropyLoss()

            def run_l():
                h, w = leaf["h"], leaf["w"]
                liger(w, h, y).backward()
                out["l"] = h.grad

            rows.append(("liger", run_l, lambda: out["l"], fresh))
        return rows
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def min_bytes(op: str, n: int, v: int, itemsize: int) -> int | None:
    """The fewest bytes of device memory the op must move (None: matmul-bound, not counted)."""
    one = n * v * itemsize
    return {"copy": 2 * one, "cross_entropy": one, "cross_entropy_and_grad": 2 * one,
            "token_logprobs_entropy": one, "kl_divergence": 2 * one, "kl_penalty_k3": 2 * one}.get(op)


def machine_name() -> str:
    if ARGS.machine:
        return ARGS.machine
    if ON_GPU:
        return torch.cuda.get_device_name()
    return f"CUDA simulator on {platform.machine()}"


def main() -> int:
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    shapes = [tuple(int(p) for p in s.lower().split("x")) for s in ARGS.shapes.split(",")]
    ops = [o.strip() for o in ARGS.ops.split(",") if o.strip()]
    for op in ops:
        if op not in OPS:
            sys.exit(f"unknown op {op!r}; expected one of {OPS}")
    machine, date = machine_name(), datetime.date.today().isoformat()
    say(f"# machine: {machine}; torch {torch.__version__}; ptx_numba {getattr(pn, '__version__', '?')}; "
        f"liger: {'yes' if LigerCrossEntropyLoss is not None else 'not installed'}; smoke: {ARGS.smoke}")
    rows = []
    for n, v in shapes:
        for dname in ARGS.dtypes.split(","):
            dt = dtypes[dname.strip()]
            gen = torch.Generator(device=DEVICE).manual_seed(n * 31 + v)
            z = (torch.randn(n, v, device=DEVICE, generator=gen) * 4).to(dt)
            r = (z.float() + torch.randn(n, v, device=DEVICE, generator=gen)).to(dt)
            y = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
            y[::17] = -100  # some ignored rows, as a real batch has
            itemsize = z.element_size()
            for op in ops:
                found = {}
                for name, fn, result, setup in contenders(op, z, r, y, ARGS.hidden_dim):
                    try:
                        ms = median_ms(fn, setup)
                    except Exception as exc:  # one contender failing must not lose the others
                        say(f"{op} {dname} [{n}, {v}] {name}: FAILED {type(exc).__name__}: {exc}")
                        continue
                    found[name] = (ms, result() if result else None)
                torch_ms = found.get("torch", (None,))[0]
                want = found.get("torch", (None, None))[1]
                nbytes = min_bytes(op, n, v, itemsize)
                for name, (ms, value) in found.items():
                    gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
                    row = {"op": op, "dtype": dname, "rows": n, "vocab": v, "contender": name,
                           "ms": f"{ms:.4f}", "gbps": "" if gbps is None else f"{gbps:.1f}",
                           "pct_of_peak_bw": "" if gbps is None else f"{100 * gbps / ARGS.peak_gbps:.1f}",
                           "vs_torch": f"{torch_ms / ms:.3f}" if torch_ms else "",
                           "rel_diff_vs_torch": (f"{rel_diff(value, want):.2e}"
                                                 if value is not None and want is not None and name != "torch"
                                                 else ""),
                           "machine": machine, "date": date}
                    rows.append(row)
                    say(f"{op:24s} {dname:9s} [{n}, {v}] {name:10s} {row['ms']:>10s} ms "
                        f"{row['gbps']:>8s} GB/s {row['pct_of_peak_bw']:>6s}% x{row['vs_torch']:>6s} vs torch "
                        f"diff {row['rel_diff_vs_torch']}")
                del found
            del z, r, y
            if ON_GPU:
                torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(ARGS.csv)), exist_ok=True)
    with open(ARGS.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    say(f"# wrote {len(rows)} rows to {ARGS.csv}")
    if ARGS.log:
        with open(ARGS.log, "w") as fh:
            fh.write("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
