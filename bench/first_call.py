"""Start-up cost: ``import ptx_numba`` and the first CPU call in a fresh process.

Every measurement runs in a new ``python`` process (what a user's script pays), three ways:

* ``import``: wall time of ``import ptx_numba`` alone (nothing is compiled at import);
* ``cold cache``: the first ``cross_entropy(..., backend="cpu")`` call with an empty Numba cache
  directory, so every kernel is compiled (once per dtype, then written to the cache);
* ``warm cache``: the same first call in a later process, which loads the compiled kernels from
  that cache (the normal case after the first run on a machine).

The cache directory is a temporary one (``NUMBA_CACHE_DIR``), so the package's own cache is neither
used nor disturbed. Each figure is the median over ``--repeat`` fresh processes.

    python bench/first_call.py                   # float32 and bfloat16, 3 processes each
    python bench/first_call.py --dtype float16 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# Runs inside each child process; prints one JSON line of seconds.
_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import ptx_numba
import_s = time.perf_counter() - start
import numpy as np
dtype = sys.argv[1]
rng = np.random.default_rng(0)
logits = rng.standard_normal((8, 4099)).astype(np.float32)
if dtype == "bfloat16":
    import ml_dtypes
    logits = logits.astype(ml_dtypes.bfloat16)
else:
    logits = logits.astype(dtype)
labels = rng.integers(0, 4099, 8)
start = time.perf_counter()
ptx_numba.cross_entropy(logits, labels, backend="cpu")
first_s = time.perf_counter() - start
start = time.perf_counter()
ptx_numba.cross_entropy(logits, labels, backend="cpu")
second_s = time.perf_counter() - start
print(json.dumps({"import": import_s, "first": first_s, "second": second_s}))
"""


def _child(dtype: str, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _CHILD, dtype], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(dtype: str, repeat: int) -> dict:
    """Median seconds: import, first call (cold and warm cache), and a second call."""
    cold, warm = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache_dir:
            cold.append(_child(dtype, cache_dir))   # compiles and fills the empty cache
            warm.append(_child(dtype, cache_dir))   # loads from it

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    return {
        "dtype": dtype,
        "import_s": med(warm, "import"),
        "first_call_cold_s": med(cold, "first"),
        "first_call_warm_s": med(warm, "first"),
        "second_call_s": med(warm, "second"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="comma-separated: float32, bfloat16, float16, float64")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    dtypes = args.dtype.split(",")
    unknown = [d for d in dtypes if d not in ("float32", "bfloat16", "float16", "float64")]
    if unknown:
        parser.error(f"unknown --dtype {', '.join(unknown)}; choose from float32, bfloat16, float16, float64")
    rows = [measure(d, args.repeat) for d in dtypes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"median of {args.repeat} fresh processes each; input [8, 4099]")
    print(f"{'dtype':<10}{'import':>10}{'1st call, cold':>16}{'1st call, warm':>16}{'2nd call':>10}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['import_s'] * 1e3:>8.0f}ms{r['first_call_cold_s']:>15.2f}s"
              f"{r['first_call_warm_s'] * 1e3:>14.0f}ms{r['second_call_s'] * 1e3:>8.2f}ms")


if __name__ == "__main__":
    main()
