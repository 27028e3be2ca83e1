"""Shared test setup.

Without a real GPU, the CUDA tests run on Numba's CUDA simulator. The simulator must be chosen before
numba is first imported, so it is switched on here (conftest is imported before any test module)
unless the caller already chose (``NUMBA_ENABLE_CUDASIM=0`` on a GPU machine, or ``=1``).
The simulator affects only the CUDA target; the CPU kernels are compiled as usual.
"""
import os
import shutil
import time

if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np
import pytest


def _let_simulated_threads_run():
    """Make the CUDA simulator's block manager hand over the GIL while it waits for its threads.

    The simulator runs each GPU thread of a block as a Python thread, and its manager polls
    them in a loop that never sleeps: it keeps the GIL from the threads doing the work, so a
    launch took seconds for [11, 37] logits and minutes for one 2**14-element row (against 0.8 s
    and 3 s with this). ``time.sleep(0)`` in the manager's ``is_alive`` poll yields the GIL once
    per thread per round; the simulation itself is unchanged.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    try:
        from numba.cuda.simulator import kernel as simulator_kernel
    except ImportError:  # numba-cuda is not installed: the CUDA tests skip
        return
    thread_class = simulator_kernel.BlockThread
    if getattr(thread_class, "_ptx_numba_yields", False):
        return
    poll = thread_class.is_alive

    def is_alive(self):
        time.sleep(0)
        return poll(self)

    thread_class.is_alive = is_alive
    thread_class._ptx_numba_yields = True


_let_simulated_threads_run()


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed on failure so a case can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed = {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(params=["portable", "avx2", "avx512"])
def cpu_isa(request, monkeypatch):
    """Run a CPU test on each exp-sum loop of the plain walk, skipping those the target lacks.

    The test id names the loop; ``config.CPU_ISA`` is set to it, and the CPU backend is checked to
    run exactly that loop for float32 and float64 logits.
    """
    from ptx_numba import config
    from ptx_numba.cpu import loop_isa
    from ptx_numba.cpu.simd import features

    available = features.available()
    if request.param not in available:
        pytest.skip(f"the compile target lacks {request.param} (available: {', '.join(available)})")
    monkeypatch.setattr(config, "CPU_AVX2", None)
    monkeypatch.setattr(config, "CPU_ISA", request.param)
    assert loop_isa(np.dtype(np.float32)) == loop_isa(np.dtype(np.float64)) == request.param
    return request.param
