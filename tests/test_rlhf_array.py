"""How ptx_numba.rlhf treats its inputs: NumPy vs torch, dtypes, devices, views, no torch at all."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import ptx_numba.rlhf as rl

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_imports_and_runs_without_torch():
    # torch made unimportable: the module still imports and computes on NumPy arrays
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('no torch here')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import ptx_numba.rlhf as rl\n"
            "assert abs(rl.kl_shaped_reward(2.5, 3.0, 0.1) - 2.2) < 1e-15\n"
            "assert rl.ppo_clip_loss([0.0], [0.0], [1.0]) == -1.0\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    # and importing it does not import torch
    code = "import sys; import ptx_numba.rlhf; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_numpy_inputs_in_any_precision_give_float64(rng):
    x = rng.normal(size=(3, 4))
    for dt in (np.float16, np.float32, np.int64):
        a = x.astype(dt)
        got = rl.margin_reward_loss(a, np.zeros_like(a), reduction="none")
        assert got.dtype == np.float64
    big_endian = x.astype(">f8")
    ro = x.copy()
    ro.setflags(write=False)
    np.testing.assert_array_equal(rl.kl_estimate(big_endian, ro, "k2"), np.zeros((3, 4)))


def test_torch_views_empty_and_mixed(rng):
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.normal(size=(5, 4)))
    xt = x.t()  # a non-contiguous view
    assert not xt.is_contiguous()
    np.testing.assert_allclose(rl.bradley_terry_loss(xt, "none").numpy(),
                               rl.bradley_terry_loss(xt.numpy(), "none"), rtol=1e-14)
    x0 = x.clone()
    rl.ppo_clip_loss(x, x0 * 0.5, x0, mask=x > 0)
    assert torch.equal(x, x0)  # inputs untouched
    e = torch.zeros(0, 3, dtype=torch.float32)
    got = rl.bradley_terry_loss(e)
    assert got.dtype == torch.float32 and got.item() == 0.0
    assert rl.ppo_clip_loss(e, e, e).item() == 0.0
    # float32 and float64 tensors together promote to float64; integers alone give the default
    a32 = torch.zeros(3, dtype=torch.float32)
    assert rl.kl_estimate(a32, torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    assert rl.kl_estimate(torch.zeros(3, dtype=torch.int64), [0.0, 1.0, 2.0]).dtype == \
        torch.get_default_dtype()
    ro = np.arange(3.0)
    ro.setflags(write=False)  # torch warns on read-only arrays unless they are copied
    assert rl.kl_estimate(a32, ro).tolist() == [0.0, -1.0, -2.0]
    ro_mask = np.array([True, False, True])
    ro_mask.setflags(write=False)
    assert rl.log_ratio_penalty(a32, ro, ro_mask).item() == -2.0
    with pytest.raises(TypeError, match="bool"):
        rl.kl_estimate(torch.zeros(3, dtype=torch.bool), a32)
    with pytest.raises(TypeError, match="real numbers"):
        rl.kl_estimate(torch.zeros(3, dtype=torch.complex64), a32)
