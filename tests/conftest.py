"""Shared test setup.

Without a real GPU, the CUDA tests run on Numba's CUDA simulator. The simulator must be chosen before
numba is first imported, so it is switched on here (conftest is imported before any test module)
unless the caller already chose (``NUMBA_ENABLE_CUDASIM=0`` on a GPU machine, or ``=1``).
The simulator affects only the CUDA target; the CPU kernels are compiled as usual.
"""
import os
import shutil

if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np
import pytest


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
