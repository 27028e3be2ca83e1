"""What each part of the AVX2 exp-sum loop costs: time the loop with parts taken out.

A cost probe, not a kernel: every variant but ``shipping`` computes a WRONG sum, and none of them
is reachable from the package. Each variant runs in its own process, which swaps the loop body
that ``ptx_numba.cpu.simd.expsum`` emits (``_term_f32`` / ``_term_f64``) for the 8-lane loop before Numba
compiles it, then times the loop like ``micro_chunk.py`` does: one thread, one L1-resident chunk
of 2048 elements, best of 9. Every variant runs twice, interleaved with the others, and the table
keeps the faster run (this machine is noisy).

    python bench/loop_ablation.py            # needs an x86-64 CPU with AVX2 and FMA

float32 lanes (float32, bfloat16 and float16 logits), vector operations per 8 elements, not
counting the one that widens a 16-bit element:

    shipping     13  clamps 2, range reduction 3, 2**(k/8) 3, polynomial 3, term 1, accumulate 1
    no-clamps    11  without vmaxps/vminps (k wraps for x far from the shift)
    no-table     11  2**(k/8) from the shifted bits alone (no vpermps, no vpaddd)
    fused-term   12  acc = fma(scale, fma(q, r, 1), acc) (rounds 1 + q*r: 1.81 ulp, over the test's 1.5)
    bare          8  all three at once

float64 (4 lanes per operation): ``shipping`` (17 operations, 14 loop constants) against
``two-constants``, the same 17 operations with the ten polynomial coefficients replaced by two
values, so the constants fit in the 16 ymm registers and LLVM no longer spills.
"""
import json
import os
import subprocess
import sys

import numpy as np

_F32_VARIANTS = {"shipping": 13, "no-clamps": 11, "no-table": 11, "fused-term": 12, "bare": 8}
_F64_VARIANTS = {"shipping": 17, "two-constants": 17}


def _patch(variant):
    """Swap the term bodies of the emitter's loops for ``variant`` (in this process only)."""
    from ptx_numba.cpu.simd import expsum as a

    # the probe swaps these module attributes; fail loudly if the emitter renames them
    if not (callable(getattr(a, "_term_f32", None)) and callable(getattr(a, "_term_f64", None))):
        raise RuntimeError("ptx_numba.cpu.simd.expsum no longer has _term_f32/_term_f64: update this probe")

    def f32_body(builder, plan, x, k8, ms, lo, hi):
        vf, vi = x.type, a._vec(a._I32, x.type.count)
        if variant not in ("no-clamps", "bare"):
            x = a._clamp(builder, x, lo, hi)
        s8 = a._fma(builder, x, k8, ms)
        r = a._fma(builder, x, k8, builder.fsub(ms, s8))
        bits = builder.bitcast(s8, vi)
        shifted = builder.shl(bits, a._splat(20, vi))
        if variant in ("no-table", "bare"):
            scale = builder.bitcast(shifted, vf)
        else:
            entry = builder.bitcast(a._lookup(builder, plan, bits), vi)
            scale = builder.bitcast(builder.add(entry, shifted), vf)
        q = a._fma(builder, a._fma(builder, a._splat(a._A3, vf), r, a._splat(a._A2, vf)), r, a._splat(a._A1, vf))
        if variant in ("fused-term", "bare"):
            # a (scale, p) pair: the loop folds it into the accumulating FMA, as for float64
            return (scale, a._fma(builder, q, r, a._splat(1.0, vf))), x
        return a._fma(builder, scale, builder.fmul(q, r), scale), x

    def f64_body(builder, plan, x, k1, ms, lo, hi):
        # the shipping body with every even coefficient 0.5 and every odd one 0.25
        vd, vq = x.type, a._vec(a._I64, x.type.count)
        x = a._clamp(builder, x, lo, hi)
        s = a._fma(builder, x, k1, ms)
        r = a._fma(builder, x, k1, builder.fsub(ms, s))
        scale = builder.bitcast(builder.shl(builder.bitcast(s, vq), a._splat(52, vq)), vd)
        r2 = builder.fmul(r, r)
        even, odd = a._splat(0.5, vd), a._splat(0.25, vd)
        for _ in range(4):
            even = a._fma(builder, even, r2, a._splat(0.5, vd))
            odd = a._fma(builder, odd, r2, a._splat(0.25, vd))
        return (scale, a._fma(builder, odd, r, even)), x

    if variant in _F32_VARIANTS and variant != "shipping":
        a._term_f32 = f32_body
    if variant == "two-constants":
        a._term_f64 = f64_body


def _child(variant):
    """Time the (patched) loop for each encoding it applies to; print one JSON line."""
    import numba

    if variant not in _F32_VARIANTS and variant not in _F64_VARIANTS:
        sys.exit(f"unknown variant {variant!r}; expected one of {sorted({*_F32_VARIANTS, *_F64_VARIANTS})}")
    _patch(variant)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from micro_chunk import _encodings, _ns_per_element, _repeat_expsum_avx2

    from ptx_numba import config

    numba.set_num_threads(1)
    values = (np.random.default_rng(0).standard_normal(config.CPU_CHUNK) * 3).astype(np.float32)
    dtypes = ["float64"] if variant == "two-constants" else ["float32", "bfloat16", "float16"]
    if variant == "shipping":
        dtypes.append("float64")
    result = {}
    for name in dtypes:
        chunk = _encodings(values)[name]
        shift = np.float64(1.0) if name == "float64" else np.float32(1.0)
        reps = 10000 if name == "float64" else 20000
        result[name] = _ns_per_element(_repeat_expsum_avx2, (chunk, shift, reps), chunk.size, reps)
    print(json.dumps(result))


def main():
    from ptx_numba.cpu.simd import avx2 as _avx2

    if not _avx2.AVAILABLE:
        sys.exit("the AVX2 loop does not run on this CPU")
    best = {}
    for _ in range(2):
        for variant in dict.fromkeys([*_F32_VARIANTS, *_F64_VARIANTS]):
            out = subprocess.run([sys.executable, __file__, "--child", variant], check=True,
                                 capture_output=True, text=True).stdout
            for dtype, ns in json.loads(out.strip().splitlines()[-1]).items():
                key = (variant, dtype)
                best[key] = min(ns, best.get(key, np.inf))
    print("ns per element, 1 thread, L1-resident chunk, faster of 2 runs; every variant but shipping is wrong")
    print(f"{'variant':15s} {'ops/8':>5s} {'float32':>8s} {'bfloat16':>9s} {'float16':>8s}")
    for variant, ops in _F32_VARIANTS.items():
        row = [best[(variant, d)] for d in ("float32", "bfloat16", "float16")]
        print(f"{variant:15s} {ops:5d} {row[0]:8.3f} {row[1]:9.3f} {row[2]:8.3f}")
    print(f"\n{'variant':15s} {'ops/4':>5s} {'float64':>8s}")
    for variant, ops in _F64_VARIANTS.items():
        print(f"{variant:15s} {ops:5d} {best[(variant, 'float64')]:8.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
