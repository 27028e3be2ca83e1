"""Compile every cuda kernel variant to PTX and SASS without a GPU (run as a script, not by pytest).

Usage: ``NUMBA_ENABLE_CUDASIM=0 python tests/gpu_sass_compile.py OUT.json [--full]``

For each variant it compiles the kernel with ``numba.cuda.compile_ptx`` for cc 8.0 and 9.0 (no
driver needed), assembles the PTX with ``ptxas -v`` for sm_80 and sm_90, and records registers,
spill bytes and errors (the cc 8.0 PTX is assembled for both). The default set covers every
encoding, rank, reduction, transform and moment; ``--full`` compiles every spec the ops use in
every transform (about four times as long). The
inner loops (the statistics scan and the gradient row loop, compiled alone as device functions)
are scanned for float64 arithmetic. ``tests/test_gpu_sass.py`` runs this in a subprocess because
the test session runs on the CUDA simulator.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    sys.exit("run with NUMBA_ENABLE_CUDASIM=0: the simulator does not generate code")

from numba import cuda, types  # noqa: E402

CCS = ((8, 0), (9, 0))
F64_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:(?:add|sub|mul|fma|div|max|min|neg|abs|sqrt|rcp|ex2|lg2)"
                    r"[.\w]*\.f64|cvt(?:\.\w+)?\.f64\.\w+)\b", re.M)
PTXAS_REG = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def answer_compute_capability(cc=(9, 0)):
    """Typing calls of device functions asks the current device for its compute capability."""
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


ELEM = {"f32": types.float32, "f64": types.float64, "f16": types.float16, "bf16": types.uint16}


def arr(enc, ndim, layout):
    return types.Array(ELEM[enc], ndim, layout, readonly=False)


def stats_variants(full: bool):
    """The statistics kernels: every encoding with the plain and the all-moments spec, both
    reductions, 2-D and 3-D; ``full`` adds every spec the ops use in every transform."""
    from ptx_numba.gpu.kernels.stats import StatsKey

    encs = ("f32", "f64", "f16", "bf16")
    plain = (True, False, False, False)
    every = (True, True, True, True)
    specs = [(plain, "plain"), (every, "temp"), (every, "softcap")]
    if full:  # the specs of the ops: CE/lse/logprobs, +entropy, entropy, smoothing, KL, kl_penalty
        specs += [((t, e, d, p), kind)
                  for t, e, d, p in [(True, True, False, False), (False, True, False, False),
                                     (True, False, True, False), (False, False, False, True),
                                     (True, False, False, True), plain]
                  for kind in ("plain", "temp", "softcap")]
    seen = set()
    for enc in encs:
        for (target, ent, dsum, pair), kind in specs:
            for ndim in (2, 3):
                for shuffle in (True, False):
                    key = StatsKey(enc, enc if pair else "", ndim, kind, target, ent, dsum, pair, 256, shuffle)
                    if not full and ndim == 3 and (not shuffle or kind == "softcap"):
                        continue
                    if key not in seen:
                        seen.add(key)
                        yield key


def grad_variants(full: bool):
    """The gradient kernels: CE (A, C, D), entropy (A, B), KL (A, B, E) coefficient sets."""
    from ptx_numba.gpu.kernels.grad import GradKey

    coefs = [(False, False, ("plain", "softcap") if not full else ("plain", "temp", "softcap")),
             (True, True, ("temp",) if not full else ("plain", "temp", "softcap"))]
    if full:
        coefs.append((True, False, ("plain", "temp", "softcap")))
    for enc in ("f32", "f64", "f16", "bf16"):
        for has_b, has_e, kinds in coefs:
            for kind in kinds:
                for ndim in (2, 3):
                    if not full and ndim == 3 and kind != "plain":
                        continue
                    yield GradKey(enc, enc if has_e else "", enc, ndim, ndim, kind, has_b, has_e, 256)


def stats_sig(key):
    from numba import types as t

    x = arr(key.encoding, key.ndim, "C" if key.ndim == 2 else "A")
    w = arr(key.w_encoding or key.encoding, key.ndim, "C" if key.ndim == 2 else "A")
    acc = t.float64 if key.encoding == "f64" else t.float32
    kernel = (x, w, t.int64, t.Array(t.int64, 1, "C"), t.Array(t.float64, 2, "C"), t.int64, acc, acc, acc,
              t.float64, t.float64)
    scan = (x, w, t.int64, t.int64, t.int32, acc, acc, acc)
    return kernel, scan


def grad_sig(key):
    from numba import types as t

    x = arr(key.encoding, key.ndim, "C" if key.ndim == 2 else "A")
    w = arr(key.w_encoding or key.encoding, key.ndim, "C" if key.ndim == 2 else "A")
    o = arr(key.out_encoding, key.out_ndim, "C" if key.out_ndim == 2 else "A")
    acc = t.float64 if key.encoding == "f64" else t.float32
    f2 = t.Array(t.float64, 2, "C")
    kernel = (x, w, t.int64, o, t.int64, t.Array(t.int64, 1, "C"), f2, f2, t.int64, acc, acc, acc, t.float64)
    row = (x, w, o, t.int64, t.int64, t.int64, t.int64, t.int32, t.int64) + (acc,) * 8 + (t.boolean,) + (
        acc, acc, t.boolean, acc, acc, acc)
    return kernel, row


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


def compile_one(name, pyfunc, sig, device, ptxas, check_f64) -> dict:
    """PTX for cc 8.0 (assembled for sm_80 and sm_90) and, for kernels, PTX for cc 9.0 too."""
    out = {"name": name}
    for cc in ((8, 0),) if device else CCS:
        try:
            ptx, _ = cuda.compile_ptx(pyfunc, sig, device=device, cc=cc)
        except Exception as exc:  # recorded, asserted by the test
            out[f"cc{cc[0]}{cc[1]}"] = {"ok": False, "log": f"{type(exc).__name__}: {exc}"[-2000:]}
            continue
        if check_f64:
            out["f64_ops"] = f64_ops(ptx)
        if device:
            out["cc80"] = {"ok": True}
            continue
        for arch in CCS if cc == (8, 0) else (cc,):
            out[f"cc{cc[0]}{cc[1]}->sm_{arch[0]}{arch[1]}"] = assemble(ptx, arch, ptxas)
    return out


def main(argv) -> int:
    path = argv[1]
    full = "--full" in argv
    answer_compute_capability()
    ptxas = ptxas_path()
    from ptx_numba.gpu.kernels.grad import build_grad_kernel, make_grad_row
    from ptx_numba.gpu.kernels.stats import build_stats_kernel, make_scan

    results = []
    start = time.perf_counter()
    seen_loops = set()
    for key in stats_variants(full):
        ksig, ssig = stats_sig(key)
        name = "stats:" + ",".join(str(v) for v in key)
        kernel = build_stats_kernel(key)
        results.append(dict(compile_one(name, kernel.py_func, ksig, False, ptxas, False), kind="kernel"))
        loop_key = key._replace(tpb=256, use_shuffle=True)
        if key.encoding != "f64" and loop_key not in seen_loops:
            seen_loops.add(loop_key)
            scan = make_scan(key)
            results.append(dict(compile_one("scan:" + ",".join(str(v) for v in key[:8]), scan.py_func, ssig,
                                            True, ptxas, True), kind="loop"))
    for key in grad_variants(full):
        ksig, rsig = grad_sig(key)
        name = "grad:" + ",".join(str(v) for v in key)
        kernel = build_grad_kernel(key)
        results.append(dict(compile_one(name, kernel.py_func, ksig, False, ptxas, False), kind="kernel"))
        if key.encoding != "f64":
            grad_row, _ = make_grad_row(key)
            results.append(dict(compile_one("grad_row:" + ",".join(str(v) for v in key), grad_row.py_func,
                                            rsig, True, ptxas, True), kind="loop"))
    with open(path, "w") as fh:
        json.dump({"seconds": time.perf_counter() - start, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
