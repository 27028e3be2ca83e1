"""Numba's threading layer: TBB preferred when installed, fork after GNU OpenMP, concurrent calls.

Numba picks its threading layer once per process, so every case that depends on the layer runs
in a fresh interpreter (``NUMBA_THREADING_LAYER`` set for it), always under a timeout, in its own
process group that is killed if it overruns: a regression here shows up as a hang or a killed
child, never as a hung test run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import ptx_numba as pn
from ptx_numba.cpu import threads
from ptx_numba.errors import KernelUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pn.__file__)))

#: Shared by every child script: inputs from a seed, the float64 reference, the contract check.
PRELUDE = textwrap.dedent("""
    import os, sys, warnings
    import numpy as np
    import ptx_numba as pn
    from ptx_numba.contract import TOL_FLOAT32, rel_error
    from ptx_numba.cpu import threads

    SEED = int(sys.argv[1])

    def batch(k):
        rng = np.random.default_rng([SEED, k])
        x = (rng.standard_normal((37, 3001)) * 4).astype(np.float32)
        x[:, 1000:1013] = -np.inf
        x[5] += np.float32(3e4)
        y = rng.integers(0, 3001, 37)
        y[y < 1013] = 1013   # labels on finite logits
        y[3] = -100          # an ignored row
        return x, y

    def exact(x, y):
        return pn.cross_entropy(x.astype(np.float64), y, backend="reference", reduction="none")

    def check(got, want):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape and rel_error(got, want) <= TOL_FLOAT32, rel_error(got, want)

    def ce_auto(k):
        x, y = batch(k)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = pn.cross_entropy(x, y, reduction="none")
        return k, got, [str(w.message) for w in caught]

    def ce_cpu(k):
        x, y = batch(k)
        try:
            return k, pn.cross_entropy(x, y, backend="cpu", reduction="none"), ""
        except Exception as exc:
            return k, None, f"{type(exc).__name__}: {exc}"

    def layer():
        return threads.active_layer()
""")


def _run(body: str, tmp_path, rng, layer: str | None, timeout: float = 60.0) -> str:
    """Run PRELUDE + body as a script in a fresh interpreter under ``layer``; its stdout.

    The script is a file with a ``__main__`` guard, so 'spawn' workers can import its functions.
    It must exit 0.
    """
    script = tmp_path / "threads_case.py"
    script.write_text(PRELUDE + "\nif __name__ == '__main__':\n"
                      + textwrap.indent(textwrap.dedent(body), "    "))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY", "PTX_NUMBA_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    seed = str(int(rng.integers(0, 2**31)))
    proc = subprocess.Popen([sys.executable, str(script), seed], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and any workers it forked
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang)\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a child that exited
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    return out


def _skip_if(out: str) -> None:
    for line in out.splitlines():
        if line.startswith("SKIP "):
            pytest.skip(line[5:])


# ---------------------------------------------------------------------------- fork, GNU OpenMP
FORK_OMP = """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # A child forked before any kernel ran is an ordinary process: it starts its own layer.
    with mp.get_context("fork").Pool(1) as pool:
        k, got, msg = pool.apply_async(ce_cpu, (0,)).get(timeout=30)
    assert msg == "", msg
    check(got, exact(*batch(0)))

    x, y = batch(1)
    check(pn.cross_entropy(x, y, backend="cpu", reduction="none"), exact(x, y))
    from numba.np.ufunc import omppool
    if layer() != "omp" or omppool.openmp_vendor != "GNU":
        print(f"SKIP layer {layer()} / {omppool.openmp_vendor}: not GNU OpenMP"); sys.exit(0)

    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        # explicit cpu: a clear error naming the fixes, not a killed worker and a hung pool
        for k, got, msg in pool.map_async(ce_cpu, [2, 3]).get(timeout=30):
            assert got is None and msg.startswith("KernelUnavailable"), msg
            assert "GNU OpenMP" in msg and "tbb" in msg and "spawn" in msg and "forkserver" in msg
        # auto: the reference answers (one warning per worker), within the contract
        results = pool.map_async(ce_auto, [4, 5, 6]).get(timeout=30)
        for k, got, warned in results:
            check(got, exact(*batch(k)))
            assert all("GNU OpenMP" in w for w in warned)
        assert any(warned for _, _, warned in results)   # the fallback is never silent

    with ProcessPoolExecutor(2, mp_context=ctx) as ex:   # was: BrokenProcessPool
        for k, got, _ in ex.map(ce_auto, [7, 8], timeout=30):
            check(got, exact(*batch(k)))

    # the parent is untouched: its kernels still run on OpenMP
    check(pn.cross_entropy(x, y, backend="cpu", reduction="none"), exact(x, y))
    assert not threads.forked_after_gnu_openmp()
    print("OK")
"""


def test_fork_after_gnu_openmp_never_kills_or_hangs(rng, tmp_path):
    out = _run(FORK_OMP, tmp_path, rng, "omp")
    _skip_if(out)
    assert out.strip().endswith("OK")


SPAWN_OMP = """
    import multiprocessing as mp
    x, y = batch(0)
    check(pn.cross_entropy(x, y, backend="cpu", reduction="none"), exact(x, y))
    # the fix the error names: a spawned worker runs the CPU kernels itself
    with mp.get_context("spawn").Pool(1) as pool:
        k, got, msg = pool.apply_async(ce_cpu, (1,)).get(timeout=45)
    assert msg == "", msg
    check(got, exact(*batch(1)))
    print("OK")
"""


def test_spawned_workers_run_the_cpu_kernels_after_openmp(rng, tmp_path):
    out = _run(SPAWN_OMP, tmp_path, rng, "omp", timeout=90)
    assert out.strip().endswith("OK")


# ----------------------------------------------------------------------------------------- tbb
FORK_TBB = """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    x, y = batch(0)
    check(pn.cross_entropy(x, y, backend="cpu", reduction="none"), exact(x, y))
    if layer() != "tbb":
        print(f"SKIP no usable TBB here (layer {layer()}); pip install 'ptx_numba[tbb]'"); sys.exit(0)
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        for k, got, msg in pool.map_async(ce_cpu, [1, 2, 3]).get(timeout=30):
            assert msg == "", msg
            check(got, exact(*batch(k)))
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        for k, got, msg in ex.map(ce_cpu, [4, 5], timeout=30):
            assert msg == "", msg
            check(got, exact(*batch(k)))
    print("OK")
"""


def test_tbb_when_installed_is_chosen_and_fork_safe(rng, tmp_path):
    """No NUMBA_THREADING_LAYER: a pip-installed TBB is found and forked workers run on it."""
    out = _run(FORK_TBB, tmp_path, rng, None)
    _skip_if(out)
    assert out.strip().endswith("OK")


EXPLICIT = """
    x, y = batch(0)
    check(pn.cross_entropy(x, y, backend="cpu", reduction="none"), exact(x, y))
    print("LAYER", layer())
"""


@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_explicit_layer_is_respected(rng, tmp_path, layer):
    out = _run(EXPLICIT, tmp_path, rng, layer)
    assert f"LAYER {layer}" in out


# ----------------------------------------------------------------------- concurrency, workqueue
CONCURRENT = """
    import threading
    assert layer() is None
    data = [batch(k) for k in range(8)]
    want = [exact(x, y) for x, y in data]
    got, errors = [None] * 8, []
    start = threading.Barrier(8)

    def work(i):
        try:
            start.wait(timeout=30)
            for _ in range(10):
                got[i] = pn.cross_entropy(*data[i], backend="cpu", reduction="none")
        except BaseException as exc:
            errors.append(repr(exc))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not errors, errors
    assert layer() == "workqueue", layer()
    for g, w in zip(got, want):
        check(g, w)
    print("OK")
"""


def test_concurrent_calls_under_workqueue_do_not_abort(rng, tmp_path):
    """Was SIGABRT: 'Concurrent access has been detected' (8 threads, first call concurrent too)."""
    out = _run(CONCURRENT, tmp_path, rng, "workqueue")
    assert out.strip().endswith("OK")


# ---------------------------------------------------------------------- in-process unit checks
def _max_concurrency(monkeypatch, layer: str, n: int = 4) -> int:
    monkeypatch.setattr(threads, "active_layer", lambda: layer)
    inside, peak, lock = [0], [0], threading.Lock()
    entered = threading.Barrier(n)

    def fn():
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            entered.wait(timeout=0.5)  # meets the others only if nothing serializes the calls
        except threading.BrokenBarrierError:
            pass
        with lock:
            inside[0] -= 1

    ts = [threading.Thread(target=threads.call, args=(fn,)) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    return peak[0]


def test_call_serializes_only_where_the_layer_needs_it(monkeypatch):
    assert _max_concurrency(monkeypatch, "workqueue") == 1
    assert _max_concurrency(monkeypatch, None) == 1          # layer not started yet
    assert _max_concurrency(monkeypatch, "tbb") == 4
    assert _max_concurrency(monkeypatch, "omp") == 4


def test_call_returns_and_raises_what_the_kernel_does():
    assert threads.call(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        threads.call(lambda: 1 / 0)


def test_flagged_fork_child_refuses_with_the_fixes(monkeypatch, rng):
    x = rng.standard_normal((3, 17)).astype(np.float32)
    y = np.array([1, -1, 16], np.int64)
    monkeypatch.setattr(threads, "_forked_after_gnu_omp", True)
    called = []
    with pytest.raises(KernelUnavailable, match="spawn") as info:
        threads.call(lambda: called.append(1))
    assert not called and "pip install 'ptx_numba[tbb]'" in str(info.value)
    from ptx_numba.cpu import BACKEND
    from ptx_numba._rowpass import StatsSpec

    with pytest.raises(KernelUnavailable, match="GNU OpenMP"):
        BACKEND.row_stats(x, y, StatsSpec(target=True))


@pytest.mark.parametrize("layer, vendor, flagged", [
    ("omp", "GNU", True), ("omp", "Intel", False), ("tbb", "GNU", False),
    ("workqueue", "GNU", False), (None, "GNU", False)])
def test_fork_hook_flags_only_gnu_openmp(monkeypatch, layer, vendor, flagged):
    class FakeOmp:
        openmp_vendor = vendor

    monkeypatch.setattr(threads, "active_layer", lambda: layer)
    monkeypatch.setitem(sys.modules, "numba.np.ufunc.omppool", FakeOmp())
    monkeypatch.setattr(threads, "_forked_after_gnu_omp", False)
    threads._after_fork_in_child()
    assert threads.forked_after_gnu_openmp() is flagged


@pytest.mark.parametrize("files, link, ok", [
    (["libtbb.so.12", "libtbb.so.12.20"], None, True),
    (["libtbb.so.12", "libtbb.so.12.6"], None, True),
    (["libtbb.so.12", "libtbb.so.12.5"], None, False),
    (["libtbb.so.12"], None, False),
    (["libtbb.so.12.11"], "libtbb.so.12.11", True),
    (["libtbb.so.12.3"], "libtbb.so.12.3", False),
])
def test_tbb_version_read_from_the_file_name(tmp_path, files, link, ok):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    if link is not None:
        (tmp_path / "libtbb.so.12").symlink_to(tmp_path / link)
    assert threads._tbb_recent_enough(str(tmp_path / "libtbb.so.12")) is ok


def test_prepare_after_the_layer_started_changes_nothing(rng):
    x = rng.standard_normal((2, 33)).astype(np.float32)
    pn.logsumexp(x, backend="cpu")
    assert threads.active_layer() in ("tbb", "omp", "workqueue")
    assert threads.prepare() == "started"
