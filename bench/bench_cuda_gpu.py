#!/usr/bin/env python
"""Forward cross-entropy throughput on a real GPU: ptx_numba's cuda backend against the copy floor,
PyTorch and (when installed) Liger-Kernel's Triton kernel.

Run on a CUDA machine (H100/H200 class), not on the simulator::

    python bench/bench_cuda_gpu.py --csv cuda_bench.csv

For every vocabulary size ``V`` (default 32000, 128256, 262144) and dtype (float32, bfloat16) it
builds one ``[N, V]`` logits array on the GPU with ``N`` chosen so the array is about
``--target-gb`` GB, and times, in the same process on the same array:

* ``copy``: a device-to-device copy of the same bytes, the bandwidth floor. Its GB/s counts the
  bytes read **and** written (2 x nbytes), i.e. the memory traffic the copy moves.
* ``ptx_numba``: ``ptx_numba.cross_entropy(logits, labels, reduction="none", backend="cuda")``,
  the public call, validation and the label check included.
* ``torch``: ``torch.nn.functional.cross_entropy(logits, labels, reduction="none")``.
* ``liger``: ``LigerCrossEntropyLoss(reduction="none")`` if ``liger_kernel`` imports. Its forward
  also writes the gradient into the logits buffer, so it gets a fresh clone before every call
  (outside the timed region).

A cross entropy's GB/s counts the logits bytes **read** once (nbytes); ``pct_of_floor`` compares it
with the copy's GB/s. Each time is the median of ``--repeats`` calls after ``--warmup`` calls,
measured with CUDA events on the default stream. Results go to ``--csv`` with columns
``op,backend,dtype,N,V,threads,machine,seconds,gbps,pct_of_floor`` and to a printed table; the
versions (numba-cuda, torch, driver) are printed and written to ``<csv>.versions.txt``.

Without torch, the data is made with NumPy and bfloat16 goes to ptx_numba's launcher directly
(the public API reads bfloat16 only from torch tensors); the torch and liger rows are skipped.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import statistics
import subprocess
import sys
from typing import Any, Callable

import numpy as np

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    sys.exit("bench_cuda_gpu.py needs a real GPU; unset NUMBA_ENABLE_CUDASIM")

from numba import cuda  # noqa: E402





import ptx_numba as pn  # noqa: E402
from ptx_numba import config  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the benchmark still runs ptx_numba and the copy floor
    torch = None

FIELDS = ["op", "backend", "dtype", "N", "V", "threads", "machine", "seconds", "gbps", "pct_of_floor"]


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_name() -> str:
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def versions() -> dict[str, str]:
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()[0]
    except Exception as exc:  # nvidia-smi missing: keep going
        driver = f"unknown ({type(exc).__name__})"
    cc = cuda.get_current_device().compute_capability
    return {
        "gpu": gpu_name(),
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "driver": driver,
        "numba": _version("numba"),
        "numba-cuda": _version("numba-cuda"),
        "ptx_numba": pn.__version__,
        "torch": torch.__version__ if torch is not None else "not installed",
        "torch_cuda": (torch.version.cuda or "none") if torch is not None else "-",
        "liger-kernel": _version("liger-kernel"),
        "triton": _version("triton"),
    }


def load_liger() -> tuple[Any, str]:
    """``(LigerCrossEntropyLoss instance or None, note)``."""
    if torch is None:
        return None, "liger skipped: torch is not installed"
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception as exc:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception:
            return None, f"liger skipped: liger_kernel is not importable ({type(exc).__name__}: {exc})"
    try:
        return LigerCrossEntropyLoss(reduction="none"), "liger: reduction='none'"
    except Exception as exc:  # older versions support only mean/sum
        return LigerCrossEntropyLoss(reduction="sum"), f"liger: reduction='sum' (none refused: {exc})"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _events():
    if torch is not None:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    return cuda.event(timing=True), cuda.event(timing=True)


def _elapsed_s(start, stop) -> float:
    stop.synchronize()
    if torch is not None:
        return start.elapsed_time(stop) / 1e3
    return cuda.event_elapsed_time(start, stop) / 1e3


def time_op(fn: Callable[[], Any], warmup: int, repeats: int, before: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (CUDA events, default stream)."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, stop = _events()
        start.record()
        fn()
        stop.record()
        times.append(_elapsed_s(start, stop))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def make_batch(n: int, v: int, dtype: str, seed: int):
    """``(logits, labels)`` on the GPU: torch tensors when torch is there, else numba arrays."""
    if torch is not None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        tdt = torch.float32 if dtype == "float32" else torch.bfloat16
        logits = (torch.randn(n, v, device="cuda", generator=gen) * 3).to(tdt)
        labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
        labels[::17] = -100
        return logits, labels
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, v), dtype=np.float32) * 3)
    if dtype == "bfloat16":  # round to nearest even, keep the top 16 bits
        bits = z.view(np.uint32)
        z = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    labels = rng.integers(0, v, n)
    labels[::17] = -100
    return cuda.to_device(z), cuda.to_device(labels)


def nbytes_of(x) -> int:
    return x.numel() * x.element_size() if torch is not None else x.size * x.dtype.itemsize


# ------------------------------------------------------------------------------------------------
# contenders
# ------------------------------------------------------------------------------------------------
def run_case(v: int, dtype: str, args, machine: str, liger, notes: list[str]) -> list[dict]:
    itemsize = 4 if dtype == "float32" else 2
    n = max(1, int(args.target_gb * 1e9) // (v * itemsize))
    logits, labels = make_batch(n, v, dtype, args.seed)
    nbytes = nbytes_of(logits)
    rows: list[dict] = []

    def add(op, backend, seconds, traffic, threads="-"):
        rows.append(dict(op=op, backend=backend, dtype=dtype, N=n, V=v, threads=threads, machine=machine,
                         seconds=seconds, gbps=traffic / seconds / 1e9, pct_of_floor=None))

    # bandwidth floor: one device-to-device copy (read + write)
    if torch is not None:
        dst = torch.empty_like(logits)
        t = time_op(lambda: dst.copy_(logits), args.warmup, args.repeats)
    else:
        dst = cuda.device_array_like(logits)
        t = time_op(lambda: dst.copy_to_device(logits), args.warmup, args.repeats)
    dst = None  # free the copy before the next contender
    add("d2d_copy", "copy", t, 2 * nbytes)
    floor = rows[-1]["gbps"]

    # ptx_numba (public API), one row per block size
    for tpb in args.threads:
        config.CUDA_THREADS_PER_BLOCK = tpb
        if torch is None and dtype == "bfloat16":
            from ptx_numba import gpu as backend  # the public API reads bf16 from torch only

            def call(backend=backend):
                out = cuda.device_array(n, dtype=np.float32)
                backend._run_rows(logits, "bf16", n, labels, -100, out)
                return out

            name = "ptx_numba(launcher)"
        else:

            def call():
                return pn.cross_entropy(logits, labels, reduction="none", backend="cuda")

            name = "ptx_numba"
        t = time_op(call, args.warmup, args.repeats)
        add("ce_forward", name, t, nbytes, threads=tpb)
        if torch is not None and tpb == args.threads[0]:
            got = torch.as_tensor(call(), device="cuda").double()
            want = F.cross_entropy(logits.double(), labels, reduction="none")
            err = ((got - want).abs() / want.abs().clamp_min(1.0)).max().item()
            notes.append(f"V={v} {dtype}: ptx_numba vs float64 torch, max rel err {err:.2e}")

    if torch is not None:
        t = time_op(lambda: F.cross_entropy(logits, labels, reduction="none"), args.warmup, args.repeats)
        add("ce_forward", "torch", t, nbytes)
        if liger is not None:
            work = torch.empty_like(logits)
            t = time_op(lambda: liger(work, labels), args.warmup, args.repeats, before=lambda: work.copy_(logits))
            work = None
            add("ce_forward", "liger", t, nbytes)

    for r in rows:
        if r["op"] != "d2d_copy":
            r["pct_of_floor"] = 100.0 * r["gbps"] / floor
    logits = labels = None  # free the batch before the next shape
    if torch is not None:
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, help="where to write the results (CSV)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 262144])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--target-gb", type=float, default=2.0, help="logits size per case, GB (1e9 bytes)")
    p.add_argument("--threads", type=int, nargs="+", default=[config.CUDA_THREADS_PER_BLOCK],
                   help="ptx_numba threads per block to try (multiples of 32)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if not cuda.is_available():
        print("no CUDA GPU visible to numba; nothing to measure", file=sys.stderr)
        return 2
    info = versions()
    machine = info["gpu"]
    liger, liger_note = load_liger()
    notes = [liger_note, "GB/s: CE counts logits bytes read; d2d_copy counts bytes read + written"]

    rows: list[dict] = []
    for v in args.vocab:
        for dtype in args.dtypes:
            rows.extend(run_case(v, dtype, args, machine, liger, notes))
            print(f"done V={v} {dtype}", file=sys.stderr)

    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "seconds": f"{r['seconds']:.6e}", "gbps": f"{r['gbps']:.1f}",
                        "pct_of_floor": "" if r["pct_of_floor"] is None else f"{r['pct_of_floor']:.1f}"})
    with open(args.csv + ".versions.txt", "w") as fh:
        fh.writelines(f"{k}: {val}\n" for k, val in info.items())
        fh.writelines(f"note: {n}\n" for n in notes)

    print("versions: " + ", ".join(f"{k}={val}" for k, val in info.items()))
    header = f"{'op':<11}{'backend':<21}{'dtype':<10}{'N':>7}{'V':>8}{'tpb':>5}{'ms':>10}{'GB/s':>9}{'% floor':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = "" if r["pct_of_floor"] is None else f"{r['pct_of_floor']:.1f}"
        print(f"{r['op']:<11}{r['backend']:<21}{r['dtype']:<10}{r['N']:>7}{r['V']:>8}{str(r['threads']):>5}"
              f"{r['seconds'] * 1e3:>10.3f}{r['gbps']:>9.1f}{pct:>9}")
    for n in notes:
        print("note:", n)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
