"""Benchmark machinery behind ``ptx-numba bench``: synthetic inputs, contenders and timing.

The table, the CSV and the plot drawn from it are in :mod:`._bench_report`.

Method (see ``docs/performance.md``): every contender runs side by side in one process on the same
array; after one warm-up call each, the contenders are timed in interleaved rounds (one call of
each per round, so a noisy neighbour slows all of them alike) and a contender's time is the median
of its calls; GB/s is the bytes of
logits read (the encoded array: 2 bytes per bfloat16/float16 element) divided by that time; the
floor is the CPU backend's parallel streaming read (``_bench_floor.stream_read``) of the same array.

Contenders are the available ptx_numba backends (called through the public function of the op,
validation included), the ``stream-read`` floor, and PyTorch's expression for the same numbers when
torch is importable. The ops and their floors are in :mod:`._bench_ops` (``--op``; the default is
:func:`ptx_numba.cross_entropy` with ``reduction="none"``).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _dispatch
from ._bench_ops import DEFAULT_OP, OPS, BenchOp, Inputs, floor_call, second_logits
from ._validate import as_host_logits

DTYPES = ("float32", "bfloat16", "float16", "float64")
STREAM_READ = "stream-read"
TORCH = "torch"
OP_CROSS_ENTROPY = DEFAULT_OP

#: The default shape: Llama-3's vocabulary, and few enough rows that the float64 NumPy reference
#: (the slow one, about 20 ns per element on a laptop-class core) finishes in a couple of seconds.
DEFAULT_VOCAB = 128256
DEFAULT_ROWS = 128
DEFAULT_REPEAT = 10

#: The reference is timed with at most this many calls (it is 10-100x slower than the kernels).
REFERENCE_MAX_REPEAT = 3
#: After the first timed call, a contender stops early once its timed calls took this long.
TIME_BUDGET_S = 2.0


class BenchError(ValueError):
    """A user error in the benchmark options (reported as one line by the CLI)."""


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def machine_description() -> str:
    """A short CPU description with the CPU backend's loop, such as ``"AMD EPYC x2 cores, avx2"``.

    The loop (:func:`ptx_numba.cpu.simd.features.choose`: ``avx512``, ``avx2`` or ``portable``)
    is part of it so that runs of one machine with ``PTX_NUMBA_CPU_ISA`` set to different loops
    are kept apart in a results CSV.
    """
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    # Marketing noise makes the string long without telling machines apart.
    model = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", " ", model)
    model = " ".join(model.split())[:48]
    described = f"{model} x{os.cpu_count() or 1} cores"
    try:
        from .cpu.simd import features
    except ImportError:  # no Numba: no CPU loop to name
        return described
    return f"{described}, {features.choose()}"


def threading_layer() -> str:
    """Numba's threading layer (``omp``, ``tbb``, ``workqueue``), once a parallel kernel has run."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # nothing parallel has run yet
        return "?"


def torch_importable() -> bool:
    """True when torch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def all_contenders(*, include_simulated: bool = False) -> list[str]:
    """Every contender that can run here, in table order (the simulated GPU only if asked)."""
    names = list(_dispatch.available_backends())
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and not include_simulated:
        # The CUDA simulator runs every GPU thread in Python: minutes per call, and a number that
        # says nothing about a GPU. It can still be asked for by name (--backends cuda).
        names = [n for n in names if n != "cuda"]
    floor = [STREAM_READ] if "cpu" in names else []
    return floor + names + ([TORCH] if torch_importable() else [])


def resolve_contenders(requested: list[str] | None) -> list[str]:
    """Check a ``--backends`` list; return it in table order (default: everything available)."""
    if not requested:
        return all_contenders()
    available = all_contenders(include_simulated=True)
    known = (STREAM_READ,) + _dispatch.BACKENDS + (TORCH,)
    for name in requested:
        if name not in known:
            raise BenchError(f"unknown backend {name!r}; choose from {', '.join(known)}")
        if name in available:
            continue
        if name == TORCH:
            raise BenchError("backend 'torch' needs PyTorch, which is not importable here")
        if name == STREAM_READ:
            raise BenchError(f"'stream-read' needs the cpu backend: {_dispatch.unavailable_reason('cpu')}")
        raise BenchError(f"backend {name!r} is not available: {_dispatch.unavailable_reason(name)}")
    return [name for name in available if name in requested]


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a ``--dtype`` name (bfloat16 comes from ml_dtypes)."""
    if name not in DTYPES:
        raise BenchError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise BenchError("bfloat16 needs ml_dtypes: pip install 'ptx_numba[bench]'") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def synthetic_logits(rng: np.random.Generator, rows: int, vocab: int, dtype: str) -> np.ndarray:
    """Normal logits with a spread like a language model's (std 3), in the requested dtype."""
    values = rng.standard_normal((rows, vocab), dtype=np.float32)
    values *= 3.0
    return values.astype(numpy_dtype(dtype))


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def median_seconds(call: Callable[[], Any], repeat: int, warmup: int, budget_s: float = TIME_BUDGET_S):
    """Median wall time of ``call`` over up to ``repeat`` timed calls, and the last result.

    Stops early (after at least one timed call) once the timed calls have taken ``budget_s``.
    """
    for _ in range(warmup):
        call()
    samples: list[float] = []
    result = None
    while len(samples) < repeat:
        start = time.perf_counter()
        result = call()
        samples.append(time.perf_counter() - start)
        if sum(samples) >= budget_s:
            break
    return statistics.median(samples), result


def interleaved_median_seconds(calls: dict[str, Callable[[], Any]], repeat: int,
                               budget_s: float = TIME_BUDGET_S) -> dict[str, float]:
    """Median wall time of each call over up to ``repeat`` rounds of one call each, in turn.

    Interleaving puts every contender under the same machine conditions, so the ratios between
    them hold on a shared, noisy machine even when the absolute times drift. Stops early (after
    at least one round) once the rounds have taken ``budget_s`` per contender.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    spent = 0.0
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            samples[name].append(elapsed)
            spent += elapsed
        if spent >= budget_s * len(calls):
            break
    return {name: statistics.median(times) for name, times in samples.items()}


def max_relative_error(got: Any, expected: np.ndarray) -> float:
    """``max_i |got_i - ref_i| / max(1, |ref_i|)`` (the numerics contract's measure)."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if got.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        err = np.abs(got - expected) / np.maximum(1.0, np.abs(expected))
    return float(np.max(err))


@dataclass
class Case:
    """One benchmark shape."""

    dtype: str
    rows: int
    vocab: int
    threads: int
    op: str = DEFAULT_OP


@dataclass
class Result:
    """One contender on one case; ``seconds`` is None when the contender failed (see ``error``)."""

    backend: str
    seconds: float | None = None
    max_rel_err: float | None = None
    error: str = ""


@contextlib.contextmanager
def thread_count(threads: int):
    """Run a block with Numba (and torch, when importable) on ``threads`` threads; restore after."""
    import numba

    torch = importlib.import_module("torch") if torch_importable() else None
    saved = numba.get_num_threads(), torch.get_num_threads() if torch else None
    numba.set_num_threads(threads)
    if torch:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(saved[0])
        if torch:
            torch.set_num_threads(saved[1])


def check_threads(threads: list[int]) -> None:
    """Numba cannot use more threads than it started with (``NUMBA_NUM_THREADS``)."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    for k in threads:
        if not 1 <= k <= limit:
            raise BenchError(f"--threads {k}: must be between 1 and {limit} (NUMBA_NUM_THREADS)")


def check_ops(names: list[str]) -> list[BenchOp]:
    """The :data:`._bench_ops.OPS` entries for ``--op`` names."""
    for name in names:
        if name not in OPS:
            raise BenchError(f"unknown op {name!r}; choose from {', '.join(OPS)}")
    return [OPS[name] for name in names]


def _contender_call(name: str, op: BenchOp, x: Inputs, encoded: list[np.ndarray]) -> Callable:
    """The zero-argument call that is timed for one contender."""
    if name == STREAM_READ:
        return floor_call(op, x, encoded)
    if name == TORCH:
        return op.torch(x)
    return lambda: op.call(x, name)


def make_inputs(case: Case, op: BenchOp, seed: int) -> Inputs:
    """The synthetic arrays of one case (a second logit set for KL, a gradient buffer)."""
    rng = np.random.default_rng(seed)
    logits = synthetic_logits(rng, case.rows, case.vocab, case.dtype)
    labels = rng.integers(0, case.vocab, size=case.rows, dtype=np.int64)
    second = second_logits(rng, logits) if op.reads == 2 else None
    return Inputs(logits, labels, second, np.empty_like(logits) if op.grad else None)


def run_case(case: Case, contenders: list[str], repeat: int, seed: int = 0) -> list[Result]:
    """Time every contender on one synthetic case; results come back in ``contenders`` order."""
    op = OPS[case.op]
    x = make_inputs(case, op, seed)
    encoded = [as_host_logits(a)[0] for a in (x.logits, x.second) if a is not None]
    results: dict[str, Result] = {}
    with thread_count(case.threads):
        # The reference goes first: its values are what every other contender is checked against.
        # It is slow, so it gets few timed calls and no warm-up (it has nothing to compile).
        ref_call = _contender_call("reference", op, x, encoded)
        if "reference" in contenders:
            seconds, got = median_seconds(ref_call, min(repeat, REFERENCE_MAX_REPEAT), warmup=0)
            results["reference"] = Result("reference", seconds, 0.0)
        else:
            got = ref_call()
        expected = op.values(got)
        del got
        calls: dict[str, Callable] = {}
        for name in contenders:
            if name in results:
                continue
            try:
                call = _contender_call(name, op, x, encoded)
                got = call()  # warm-up: compiles, and is the result that gets checked
                err = None if name == STREAM_READ else max_relative_error(op.values(_numpy(got)), expected)
            except Exception as exc:  # e.g. a dtype torch has no CPU kernel for: report it, go on
                results[name] = Result(name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:60])
                continue
            results[name] = Result(name, None, err)
            calls[name] = call
        for name, seconds in interleaved_median_seconds(calls, repeat).items():
            results[name].seconds = seconds
    return [results[name] for name in contenders]


def _numpy(result: Any) -> Any:
    """Torch tensors (and tuples of them) as float64 NumPy arrays; anything else unchanged."""
    if isinstance(result, tuple):
        return tuple(_numpy(r) for r in result)
    if hasattr(result, "detach") and hasattr(result, "numpy"):
        return result.detach().double().numpy()
    return result


def logits_nbytes(case: Case) -> int:
    """Bytes the floor of a case moves: its op's logit traffic (2 bytes per 16-bit element)."""
    return case.rows * case.vocab * numpy_dtype(case.dtype).itemsize * OPS[case.op].traffic
