"""ptx_numba.rlhf KL estimates, log-ratio penalty and shaped rewards vs float64 NumPy and torch."""
import math

import numpy as np
import pytest

import ptx_numba.rlhf as rl
from exact import as_f64, rel_error

#: ptx_numba.rlhf's own precision, not the kernels' contract: its float64 formulas agree with the
#: scalar float64 loops below to 1e-10; float32 inputs (torch) to RLHF_TOL32, float32 rounding.
RLHF_TOL64, RLHF_TOL32 = 1e-10, 2e-5


def close(got, exact, tol=RLHF_TOL64):
    """Relative error (to max(1, |exact|)) within ``tol``; infinities equal, no NaN."""
    got, exact = as_f64(got), as_f64(exact)
    assert got.shape == exact.shape
    assert not np.isnan(got).any()
    err = rel_error(got, exact)
    assert err <= tol, err


def ref_estimate(lp, ref, est):
    """Scalar-by-scalar float64 formulas (math module), independent of the array code."""
    out = np.empty(np.broadcast_shapes(np.shape(lp), np.shape(ref)))
    lp, ref = np.broadcast_to(lp, out.shape), np.broadcast_to(ref, out.shape)
    for idx in np.ndindex(out.shape):
        r = float(lp[idx]) - float(ref[idx])
        out[idx] = {"k1": r, "abs": abs(r), "k2": 0.5 * r * r,
                    "k3": math.exp(-r) - 1.0 + r if abs(r) > 1e-3 else
                    r * r / 2 - r ** 3 / 6 + r ** 4 / 24 - r ** 5 / 120}[est]
    return out


# ---------------------------------------------------------------- kl_estimate

@pytest.mark.parametrize("est", rl.ESTIMATORS)
def test_kl_estimate_matches_float64(rng, est):
    lp = -rng.exponential(2.0, size=(3, 7))
    ref = -rng.exponential(2.0, size=(3, 7))
    close(rl.kl_estimate(lp, ref, est), ref_estimate(lp, ref, est))
    # float32 NumPy input is computed in float64
    got = rl.kl_estimate(lp.astype(np.float32), ref.astype(np.float32), est)
    assert got.dtype == np.float64
    close(got, ref_estimate(lp.astype(np.float32), ref.astype(np.float32), est))


def test_kl_estimate_broadcasts_and_strided(rng):
    lp = -rng.exponential(size=(4, 9))[:, ::2]  # strided view
    ref = -rng.exponential(size=(1, 5))
    lp0 = lp.copy()
    close(rl.kl_estimate(lp, ref, "k3"), ref_estimate(lp, ref, "k3"))
    np.testing.assert_array_equal(lp, lp0)  # caller's array untouched


def test_k3_keeps_digits_for_tiny_ratios(rng):
    # Against the series summed in exact rational arithmetic, across decades of |r|, both signs
    # (the naive exp(-r) - 1 + r has relative error ~1e-4 at r = 1e-6).
    from fractions import Fraction
    r = rng.choice([-1, 1], size=60) * 10.0 ** rng.uniform(-9, -0.5, size=60)
    got = rl.kl_estimate(r, np.zeros_like(r), "k3")
    for x, g in zip(r, got):
        q = Fraction(float(x))
        exact = sum((-q) ** k / math.factorial(k) for k in range(2, 40))
        assert abs(Fraction(float(g)) - exact) <= 1e-13 * abs(exact), (x, g, float(exact))
    assert (got > 0).all()


def test_k3_and_k2_nonnegative_k1_sign(rng):
    lp, ref = rng.normal(size=40), rng.normal(size=40)
    assert (rl.kl_estimate(lp, ref, "k3") >= 0).all()
    assert (rl.kl_estimate(lp, ref, "k2") >= 0).all()
    assert (rl.kl_estimate(lp, ref, "abs") >= 0).all()
    assert (rl.kl_estimate(lp, ref, "k1") < 0).any()


def test_kl_estimate_clamp(rng):
    lp, ref = rng.normal(scale=5, size=30), rng.normal(scale=5, size=30)
    got = rl.kl_estimate(lp, ref, "k3", clamp=(-10, 10))
    close(got, np.clip(ref_estimate(lp, ref, "k3"), -10, 10))
    got = rl.kl_estimate(lp, ref, "k1", clamp=(-0.5, 1.0))
    close(got, np.clip(lp - ref, -0.5, 1.0))


def test_kl_estimate_extremes():
    lp = np.array([-1e4, 0.0, -np.inf, -3e4, 0.0])
    ref = np.array([0.0, -1e4, -1.0, -3e4 + 1e-3, -np.inf])
    r3 = -3e4 - (-3e4 + 1e-3)  # the float64 difference, about -1e-3
    close(rl.kl_estimate(lp, ref, "k1"), [-1e4, 1e4, -np.inf, r3, np.inf])
    k3 = rl.kl_estimate(lp, ref, "k3")  # exp(1e4) overflows: inf is the true value's float64
    close(k3, [np.inf, 1e4 - 1, np.inf, ref_estimate(r3, 0.0, "k3")[()], np.inf])
    close(rl.kl_estimate(lp, ref, "k3", clamp=(-10, 10)),
          [10.0, 10.0, 10.0, ref_estimate(r3, 0.0, "k3")[()], 10.0])
    close(rl.kl_estimate(lp, ref, "k2"), [5e7, 5e7, np.inf, r3 * r3 / 2, np.inf])


def test_kl_estimate_empty():
    out = rl.kl_estimate(np.zeros((0, 3)), np.zeros((0, 3)), "k3")
    assert out.shape == (0, 3)


def test_kl_estimate_bad_input():
    with pytest.raises(ValueError, match="kl_penalty"):
        rl.kl_estimate([0.0], [0.0], "full")
    with pytest.raises(ValueError, match="k1.*abs.*k2.*k3"):
        rl.kl_estimate([0.0], [0.0], "k4")
    with pytest.raises(ValueError, match="broadcast"):
        rl.kl_estimate(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="lo <= hi"):
        rl.kl_estimate([0.0], [0.0], clamp=(1, -1))
    with pytest.raises(TypeError, match="clamp"):
        rl.kl_estimate([0.0], [0.0], clamp=1.0)
    with pytest.raises(TypeError, match="real numbers"):
        rl.kl_estimate(["a"], [0.0])
    with pytest.raises(TypeError, match="real numbers"):
        rl.kl_estimate(np.array([1 + 1j]), [0.0])
    with pytest.raises(ValueError, match="ragged"):
        rl.kl_estimate([[0.0], [0.0, 1.0]], [0.0])


# ---------------------------------------------------------------- log_ratio_penalty

def test_log_ratio_penalty_equal_logprobs_is_exactly_zero(rng):
    lp = -rng.exponential(3.0, size=(5, 11)) - 3e4
    out = rl.log_ratio_penalty(lp, lp.copy())
    assert out.shape == (5,)
    assert (out == 0.0).all()


def test_log_ratio_penalty_masked(rng):
    lp, ref = -rng.exponential(size=(4, 6)), -rng.exponential(size=(4, 6))
    mask = rng.random((4, 6)) < 0.6
    mask[0] = False
    lp_pad = np.where(mask, lp, -np.inf)  # padding holds -inf; must not leak
    exact = np.array([sum(lp[i, t] - ref[i, t] for t in range(6) if mask[i, t]) for i in range(4)])
    close(rl.log_ratio_penalty(lp_pad, ref, mask), exact)
    close(rl.log_ratio_penalty(lp_pad, ref, mask.astype(np.int8)), exact)
    assert rl.log_ratio_penalty(lp_pad, ref, mask)[0] == 0.0
    close(rl.log_ratio_penalty(lp, ref), (lp - ref).sum(-1))


def test_log_ratio_penalty_empty_and_errors():
    assert rl.log_ratio_penalty(np.zeros((3, 0)), np.zeros((3, 0))).tolist() == [0.0] * 3
    assert rl.log_ratio_penalty(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)
    with pytest.raises(ValueError, match="1-D"):
        rl.log_ratio_penalty(1.0, 1.0)
    with pytest.raises(ValueError, match="mask"):
        rl.log_ratio_penalty(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 4)))


# ---------------------------------------------------------------- kl_shaped_reward

def test_kl_shaped_reward_seed_number():
    assert rl.kl_shaped_reward(2.5, 3.0, 0.1) == pytest.approx(2.2, abs=1e-15)
    assert isinstance(rl.kl_shaped_reward(2.5, 3.0, 0.1), np.float64)


def test_kl_shaped_reward_arrays(rng):
    r, kl = rng.normal(size=(3, 1)), rng.exponential(size=(1, 4))
    close(rl.kl_shaped_reward(r, kl, 0.05), r - 0.05 * kl)
    with pytest.raises(ValueError, match="kl_coef"):
        rl.kl_shaped_reward(1.0, 1.0, -0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        rl.kl_shaped_reward(1.0, 1.0, float("nan"))
    with pytest.raises(TypeError, match="kl_coef"):
        rl.kl_shaped_reward(1.0, 1.0, "0.1")


# ---------------------------------------------------------------- token_level_rewards

def ref_token_rewards(scores, lp, ref, mask, kl_coef, est, clip):
    """The loop OpenRLHF's compute_reward documents: -kl_coef*KL, score at the last valid token."""
    out = np.zeros(lp.shape)
    kl = ref_estimate(np.where(mask, lp, 0.0), np.where(mask, ref, 0.0), est)
    for i in np.ndindex(lp.shape[:-1]):
        s = float(scores[i])
        if clip is not None:
            s = min(max(s, -clip), clip)
        for t in range(lp.shape[-1]):
            if mask[i + (t,)]:
                out[i + (t,)] = -kl_coef * kl[i + (t,)]
        for t in reversed(range(lp.shape[-1])):
            if mask[i + (t,)]:
                out[i + (t,)] += s
                break
    return out


@pytest.mark.parametrize("est,clip", [("k1", None), ("k3", 0.7), ("k2", None), ("abs", 5.0)])
def test_token_level_rewards(rng, est, clip):
    shape = (2, 3, 7)
    lp, ref = -rng.exponential(size=shape), -rng.exponential(size=shape)
    mask = rng.random(shape) < 0.7
    mask[0, 0] = False  # a sequence with no valid token: all-zero row
    mask[1, 1] = [False, False, True, True, True, False, False]  # left and right padding
    scores = rng.normal(scale=2.0, size=shape[:-1])
    lp_pad = np.where(mask, lp, -np.inf)
    got = rl.token_level_rewards(scores, lp_pad, ref, mask, kl_coef=0.05, estimator=est, clip=clip)
    close(got, ref_token_rewards(scores, lp, ref, mask, 0.05, est, clip))
    assert (got[0, 0] == 0).all()
    assert (got[~mask] == 0).all()


def test_token_level_rewards_sum_identity(rng):
    # Summed over tokens, the rewards are the score minus kl_coef times the sequence k1 KL.
    lp, ref = -rng.exponential(size=(5, 8)), -rng.exponential(size=(5, 8))
    mask = np.ones((5, 8), bool)
    mask[:, 6:] = False
    s = rng.normal(size=5)
    got = rl.token_level_rewards(s, lp, ref, mask, kl_coef=0.2).sum(-1)
    close(got, s - 0.2 * rl.log_ratio_penalty(lp, ref, mask))


def test_token_level_rewards_errors():
    z = np.zeros((2, 3))
    m = np.ones((2, 3))
    with pytest.raises(ValueError, match="scores"):
        rl.token_level_rewards(np.zeros(3), z, z, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="same shape"):
        rl.token_level_rewards(np.zeros(2), z, np.zeros((2, 4)), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip"):
        rl.token_level_rewards(np.zeros(2), z, z, m, kl_coef=0.1, clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        rl.token_level_rewards(np.zeros(2), z, z, m, kl_coef=0.1, clip=-1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        rl.token_level_rewards(np.zeros(2), z, z, m, kl_coef=-1.0)
    with pytest.raises(ValueError, match="valid estimators"):
        rl.token_level_rewards(np.zeros(2), z, z, m, kl_coef=0.1, estimator="k5")
    with pytest.raises(TypeError, match="mask"):
        rl.token_level_rewards(np.zeros(2), z, z, None, kl_coef=0.1)
    empty = rl.token_level_rewards(np.zeros(2), np.zeros((2, 0)), np.zeros((2, 0)),
                                   np.zeros((2, 0)), kl_coef=0.1)
    assert empty.shape == (2, 0)


# ---------------------------------------------------------------- torch

@pytest.mark.parametrize("est", rl.ESTIMATORS)
def test_kl_estimate_torch(rng, est):
    torch = pytest.importorskip("torch")
    lp = -rng.exponential(size=(3, 5))
    ref = -rng.exponential(size=(3, 5))
    t32 = rl.kl_estimate(torch.tensor(lp, dtype=torch.float32),
                         torch.tensor(ref, dtype=torch.float32), est)
    assert t32.dtype == torch.float32
    exact = ref_estimate(lp.astype(np.float32), ref.astype(np.float32), est)
    close(t32.numpy(), exact, tol=RLHF_TOL32)
    a = torch.tensor(lp, requires_grad=True)
    b = torch.tensor(ref, requires_grad=True)
    close(rl.kl_estimate(a, b, est).detach().numpy(), ref_estimate(lp, ref, est))
    lp_g = lp + 0.3  # keep r away from 0, where |r| has its kink
    a = torch.tensor(np.where(lp - ref > 0, lp_g, lp - 0.3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: rl.kl_estimate(x, y, est), (a, b))
    if est == "k3":  # the series branch, |r| < 0.01
        small = torch.tensor(rng.uniform(-5e-3, 5e-3, size=6), requires_grad=True)
        zero = torch.zeros(6, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda x: rl.kl_estimate(x, zero, est), (small,))
    # a torch tensor against a NumPy array: the result is a tensor
    mixed = rl.kl_estimate(torch.tensor(lp), ref, est)
    assert isinstance(mixed, torch.Tensor)


def test_torch_bfloat16_and_clamp(rng):
    torch = pytest.importorskip("torch")
    lp = torch.tensor(rng.normal(size=8), dtype=torch.bfloat16)
    out = rl.kl_estimate(lp, torch.zeros(8, dtype=torch.bfloat16), "k3", clamp=(0.0, 0.5))
    assert out.dtype == torch.bfloat16
    exact = np.clip(ref_estimate(lp.double().numpy(), 0.0, "k3"), 0.0, 0.5)
    close(out.double().numpy(), exact, tol=1e-2)


def test_token_level_rewards_and_penalty_torch(rng):
    torch = pytest.importorskip("torch")
    shape = (3, 6)
    lp, ref = -rng.exponential(size=shape), -rng.exponential(size=shape)
    mask = rng.random(shape) < 0.7
    mask[2] = False
    s = rng.normal(size=3)
    lp_pad = np.where(mask, lp, -np.inf)
    got = rl.token_level_rewards(torch.tensor(s), torch.tensor(lp_pad), torch.tensor(ref),
                                 torch.tensor(mask), kl_coef=0.1, estimator="k3", clip=1.0)
    assert got.dtype == torch.float64
    close(got.numpy(), ref_token_rewards(s, lp, ref, mask, 0.1, "k3", 1.0))
    a = torch.tensor(lp, requires_grad=True)
    pen = rl.log_ratio_penalty(a, torch.tensor(ref), torch.tensor(mask))
    close(pen.detach().numpy(), rl.log_ratio_penalty(lp, ref, mask))
    pen.sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), mask.astype(float))
    shaped = rl.kl_shaped_reward(torch.tensor(2.5, dtype=torch.float32), 3.0, 0.1)
    assert shaped.dtype == torch.float32 and abs(shaped.item() - 2.2) < 1e-6


def test_torch_device_mismatch_is_an_error():
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "device"):
        pytest.skip("no torch.device")
    a = torch.zeros(3)
    b = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        rl.kl_estimate(a, b)
