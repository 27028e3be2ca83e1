"""Compile the cuda kernels to PTX and SASS without a GPU (run as a script, not by pytest).

Usage: ``NUMBA_ENABLE_CUDASIM=0 python tests/gpu_sass_compile.py OUT.json [--full] [--jobs N]``

Which kernels: :mod:`ptx_numba.gpu.kernels.variants` lists every key the public ops can launch,
and a key is exactly one compiled kernel (the kernels are compiled for a single signature of 3-D
arrays of any layout: rank, shapes, strides, labels, temperature and softcap values are runtime
arguments). The default set is every key of the default thread count with the warp-shuffle
reduction (what a GPU runs), plus the shared-memory tree reduction for every statistics spec in
float32 and float64 (the reduction is a device function that depends on the accumulation type
and the moments only, not on the encoding, so f16/bf16 with the tree reuse the f32 code). Pairs
of logit sets are compiled with both sets in one encoding: the second set goes through the same
loader as a first set of its encoding, which the default set compiles. ``--full`` adds the tree
reduction for every key and every mixed pair of encodings.

For each kernel: NVVM PTX for compute capability 8.0, assembled by ``ptxas -v`` for sm_80 and
sm_90 (registers, spill bytes, errors); for the bfloat16 kernels (and every kernel with
``--full``) NVVM PTX for 9.0 too, assembled for sm_90. The inner loops (the statistics scan
and the gradient row loop, device functions of their own) are scanned for float64 arithmetic in
their own PTX. ``tests/test_gpu_sass.py`` runs this in a subprocess because the test session
runs on the CUDA simulator.

Where the time goes (measured on a 2-core machine): Numba's typing and lowering of a kernel's
device functions, ~5-7 s per kernel when nothing is shared; NVVM ~0.5-0.8 s per capability;
ptxas ~0.2-0.3 s per target. The kernels' device-function factories are cached, so a worker
types a shared piece (loaders, block reduction, finish, the scan of a spec) once, and the keys
are grouped by encoding so that each worker sees the keys that share the most. The default set
(82 kernels, 48 inner loops) takes about 175 CPU seconds in all on such a machine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

CCS = ((8, 0), (9, 0))
F64_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:(?:add|sub|mul|fma|div|max|min|neg|abs|sqrt|rcp|ex2|lg2)"
                    r"[.\w]*\.f64|cvt(?:\.\w+)?\.f64\.\w+)\b", re.M)
PTXAS_REG = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
#: Encodings whose kernels also get NVVM PTX for cc 9.0 in the default set.
CC90_ENCODINGS = ("bf16",)


def answer_compute_capability(cc=(9, 0)):
    """Typing calls of device functions asks the current device for its compute capability."""
    from numba import cuda

    dispatcher = sys.modules[cuda.jit.__module__.rsplit(".", 1)[0] + ".dispatcher"]

    class _Device:
        compute_capability = cc

    dispatcher.get_current_device = lambda: _Device()


def ptxas_path() -> str:
    import nvidia

    for base in nvidia.__path__:
        for sub in ("cu13/bin", "cuda_nvcc/bin", "cu12/bin"):
            path = os.path.join(base, sub, "ptxas")
            if os.path.exists(path):
                return path
    raise FileNotFoundError("ptxas not found under the nvidia wheels (pip install nvidia-cuda-nvcc)")


def jobs_for(full: bool) -> list[tuple[str, tuple, bool]]:
    """``(family, key, with cc 9.0 PTX)`` of every kernel to compile."""
    from ptx_numba.gpu.kernels import variants

    out = []
    shuffle = variants.stats_keys(reductions=(True,), mixed=full)
    tree = variants.stats_keys(reductions=(False,), mixed=full)
    if not full:
        tree = [k for k in tree if k.encoding in ("f32", "f64")]
    for key in shuffle + tree:
        out.append(("stats", tuple(key), full or key.encoding in CC90_ENCODINGS))
    for key in variants.grad_keys(mixed=full):
        out.append(("grad", tuple(key), full or key.encoding in CC90_ENCODINGS))
    return out


def key_name(family: str, key: tuple) -> str:
    return family + ":" + ",".join(str(v) for v in key)


def assemble(ptx: str, cc, ptxas: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    spills = [int(a) + int(b) for a, b in PTXAS_SPILL.findall(text)]
    regs = [int(r) for r in PTXAS_REG.findall(text)]
    return {"ok": res.returncode == 0, "registers": max(regs, default=-1), "spill_bytes": sum(spills),
            "log": text[-2000:] if res.returncode else ""}


def f64_ops(ptx: str) -> list[str]:
    return sorted({m.group(0).strip() for m in F64_OP.finditer(ptx)})


def _device_ptx(dispatcher, cc=(8, 0)) -> str:
    """PTX of a device function as the kernel compiled it (its one overload, with its callees)."""
    (cres,) = dispatcher.overloads.values()
    return cres.library.get_asm_str(cc=cc)


_STATE: dict = {}


def _init_worker():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    answer_compute_capability()
    _STATE["ptxas"] = ptxas_path()
    _STATE["loops"] = set()


def compile_group(jobs: list) -> list[dict]:
    """Compile a group of kernels in this worker (the factories' caches live across groups)."""
    from numba import cuda

    from ptx_numba.gpu.kernels.grad import GradKey, build_grad_kernel, grad_signature
    from ptx_numba.gpu.kernels.stats import StatsKey, build_stats_kernel, stats_signature

    ptxas = _STATE["ptxas"]
    results = []
    for family, raw, with_cc90 in jobs:
        t0 = time.perf_counter()
        if family == "stats":
            key = StatsKey(*raw)
            pyfunc, sig, loop = build_stats_kernel(key), stats_signature(key), "scan"
        else:
            key = GradKey(*raw)
            pyfunc, sig, loop = build_grad_kernel(key), grad_signature(key), "grad_row"
        rec = {"name": key_name(family, raw), "kind": "kernel", "family": family}
        for cc in CCS if with_cc90 else CCS[:1]:
            tag = f"cc{cc[0]}{cc[1]}"
            try:
                ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=cc)
            except Exception as exc:  # recorded, asserted by the test
                rec[tag] = {"ok": False, "log": f"{type(exc).__name__}: {exc}"[-2000:]}
                continue
            for arch in CCS if cc == (8, 0) else (cc,):
                rec[f"{tag}->sm_{arch[0]}{arch[1]}"] = assemble(ptx, arch, ptxas)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(rec)
        inner = getattr(pyfunc, loop)
        loop_name = f"{loop}:" + ",".join(str(v) for v in raw)
        if key.encoding != "f64" and id(inner) not in _STATE["loops"] and inner.overloads:
            _STATE["loops"].add(id(inner))
            try:
                found = {"ok": True, "f64_ops": f64_ops(_device_ptx(inner))}
            except Exception as exc:
                found = {"ok": False, "f64_ops": [], "log": f"{type(exc).__name__}: {exc}"[-2000:]}
            results.append(dict(found, name=loop_name, kind="loop", family=family))
    return results


def _groups(jobs, n):
    """Jobs grouped by (family, encoding), largest first (one task each)."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault((job[0], job[1][0]), []).append(job)
    return sorted(groups.values(), key=len, reverse=True)


def main(argv) -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        sys.exit("run with NUMBA_ENABLE_CUDASIM=0: the simulator does not generate code")
    path = argv[1]
    full = "--full" in argv
    n_jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    jobs = jobs_for(full)
    results = []
    if n_jobs <= 1:
        _init_worker()
        for group in _groups(jobs, 1):
            results += compile_group(group)
    else:
        with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            for part in pool.map(compile_group, _groups(jobs, n_jobs)):
                results += part
    expected = [key_name(f, k) for f, k, _ in jobs]
    with open(path, "w") as fh:
        json.dump({"seconds": round(time.perf_counter() - start, 1), "full": full, "expected": expected,
                   "cc90": [key_name(f, k) for f, k, c in jobs if c], "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
