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
