"""Tunables read from the environment never break the import; a bad value is named when used."""
import os
import subprocess
import sys

import pytest

from ptx_numba import config


@pytest.mark.parametrize("name", ["PTX_NUMBA_CUDA_TPB", "PTX_NUMBA_CUDA_MAX_BLOCKS"])
def test_bad_env_int_does_not_break_import_or_version(name):
    env = dict(os.environ, **{name: "abc"})
    code = "import ptx_numba, ptx_numba.cli; print(ptx_numba.__version__)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "ptx_numba.cli", "--version"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "ptx-numba" in res.stdout, res.stderr


def test_bad_env_int_is_named_at_first_use(monkeypatch):
    monkeypatch.setenv("PTX_NUMBA_CUDA_TPB", "abc")
    setting = config.EnvInt("PTX_NUMBA_CUDA_TPB", 256)
    with pytest.raises(ValueError, match=r"PTX_NUMBA_CUDA_TPB='abc' is not an integer"):
        int(setting)


@pytest.mark.parametrize("raw, want", [(None, 256), ("", 256), ("128", 128), (" 64 ", 64)])
def test_env_int_values(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("PTX_NUMBA_CUDA_TPB", raising=False)
    else:
        monkeypatch.setenv("PTX_NUMBA_CUDA_TPB", raw)
    assert int(config.EnvInt("PTX_NUMBA_CUDA_TPB", 256)) == want
