"""ptx_numba.rlhf.ppo_clip_loss against a scalar float64 loop and verl's definition in torch."""
import math

import numpy as np
import pytest

import ptx_numba.rlhf as rl
from exact import rel_error


def ref_ppo(lp, old, adv, eps, eps_high, dual, mask):
    """Token by token with the math module: the case analysis of the clipped surrogate."""
    shape = np.broadcast_shapes(np.shape(lp), np.shape(old), np.shape(adv),
                                np.shape(mask) if mask is not None else ())
    lp, old, adv = (np.broadcast_to(a, shape) for a in (lp, old, adv))
    mask = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
    total, count = 0.0, 0
    for i in np.ndindex(shape):
        if not mask[i]:
            continue
        rho = math.exp(min(max(float(lp[i]) - float(old[i]), -20.0), 20.0))
        a = float(adv[i])
        clipped = min(max(rho, 1 - eps), 1 + eps_high)
        loss = -min(rho * a, clipped * a)
        if dual is not None and a < 0:
            loss = min(loss, -dual * a)
        total += loss
        count += 1
    return total / count if count else 0.0


def inputs(rng, shape):
    old = -rng.exponential(size=shape)
    lp = old + rng.normal(scale=0.4, size=shape)  # ratios on both sides of the clip range
    adv = rng.normal(size=shape)
    return lp, old, adv


#: ptx_numba.rlhf's own precision, not the kernels' contract: its float64 loss agrees with the
#: scalar loop to 1e-10; float32 inputs (torch) to RLHF_TOL32, float32 rounding.
RLHF_TOL64, RLHF_TOL32 = 1e-10, 2e-5


def close(got, exact, tol=RLHF_TOL64):
    assert np.isfinite(got)
    assert rel_error(float(got), exact) <= tol, (got, exact)


@pytest.mark.parametrize("eps,eps_high,dual", [(0.2, None, None), (0.2, 0.28, None),
                                               (0.1, None, 3.0), (0.2, 0.3, 1.5)])
def test_ppo_matches_scalar_loop(rng, eps, eps_high, dual):
    lp, old, adv = inputs(rng, (3, 11))
    mask = rng.random((3, 11)) < 0.8
    lp_pad = np.where(mask, lp, -np.inf)  # padding holds -inf log-probs
    got = rl.ppo_clip_loss(lp_pad, old, adv, clip_eps=eps, clip_eps_high=eps_high,
                           dual_clip=dual, mask=mask)
    close(got, ref_ppo(lp, old, adv, eps, eps_high or eps, dual, mask))
    assert isinstance(got, np.float64)
    close(rl.ppo_clip_loss(lp, old, adv, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual),
          ref_ppo(lp, old, adv, eps, eps_high or eps, dual, None))


def test_ppo_sequence_advantages_broadcast(rng):
    lp, old, _ = inputs(rng, (4, 9))
    adv = rng.normal(size=(4, 1))  # one advantage per sequence (GRPO)
    mask = np.arange(9) < rng.integers(0, 10, size=(4, 1))
    close(rl.ppo_clip_loss(lp, old, adv, mask=mask.astype(np.float32)),
          ref_ppo(lp, old, adv, 0.2, 0.2, None, mask))


def test_ppo_known_cases():
    # ratio e^0.5 with A = -1: unclipped term wins (pessimistic); ratio 1 with A = 1: -1
    got = rl.ppo_clip_loss([0.0, 0.5], [0.0, 0.0], [1.0, -1.0])
    close(got, (-1.0 + math.exp(0.5)) / 2)
    # dual clip bounds the A < 0 loss at -c*A: ratio e^5 with A = -2 and c = 3 gives 6
    close(rl.ppo_clip_loss([5.0], [0.0], [-2.0], dual_clip=3.0), 6.0)
    # ratio e^-5 with A = 1: min(rho*A, clip(rho)*A) = min(0.0067, 0.8), the unclipped term
    close(rl.ppo_clip_loss([-5.0], [0.0], [1.0]), -math.exp(-5.0))
    # equal log-probs: the loss is -mean(A)
    close(rl.ppo_clip_loss([0.3, -2.0, 1.0], [0.3, -2.0, 1.0], [1.0, 2.0, -0.5]), -2.5 / 3)


def test_ppo_extremes_empty_and_no_valid_token():
    # log-ratios of +-1e4 are clamped to +-20 before exp: finite
    got = rl.ppo_clip_loss([1e4, -1e4, 0.0], [0.0, 0.0, 1e4], [-1.0, 1.0, 2.0])
    close(got, ref_ppo(np.array([1e4, -1e4, 0.0]), np.array([0.0, 0.0, 1e4]),
                       np.array([-1.0, 1.0, 2.0]), 0.2, 0.2, None, None))
    assert rl.ppo_clip_loss(np.zeros((2, 0)), np.zeros((2, 0)), np.zeros((2, 0))) == 0.0
    assert rl.ppo_clip_loss([np.nan, 1.0], [0.0, -np.inf], [1.0, 1.0], mask=[0, 0]) == 0.0


def test_ppo_bad_input():
    z = np.zeros(3)
    for kw, word in [({"clip_eps": 0.0}, "clip_eps"), ({"clip_eps": 1.0}, "clip_eps"),
                     ({"clip_eps": float("nan")}, "clip_eps"),
                     ({"clip_eps_high": -0.1}, "clip_eps_high"),
                     ({"dual_clip": 1.0}, "dual_clip"), ({"dual_clip": 0.5}, "dual_clip")]:
        with pytest.raises(ValueError, match=word):
            rl.ppo_clip_loss(z, z, z, **kw)
    with pytest.raises(TypeError, match="clip_eps"):
        rl.ppo_clip_loss(z, z, z, clip_eps="0.2")
    with pytest.raises(ValueError, match="broadcast"):
        rl.ppo_clip_loss(z, np.zeros(4), z)
    with pytest.raises(ValueError, match="mask"):
        rl.ppo_clip_loss(z, z, z, mask=np.ones(2))


def verl_policy_loss(torch, lp, old, adv, mask, eps_low, eps_high, c):
    """verl's compute_policy_loss (dual-clip, token-mean) re-expressed in torch for the check."""
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    clip1 = torch.maximum(l1, l2)
    clip2 = torch.minimum(-adv * c, clip1)
    per_token = torch.where(adv < 0, clip2, clip1)
    return (per_token * mask).sum() / mask.sum()


def test_ppo_torch_matches_verl_and_gradcheck(rng):
    torch = pytest.importorskip("torch")
    lp, old, adv = inputs(rng, (3, 7))
    mask = rng.random((3, 7)) < 0.8
    mask[0, 0] = True
    t = [torch.tensor(a) for a in (lp, old, adv)]
    tm = torch.tensor(mask)
    got = rl.ppo_clip_loss(*t, clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, mask=tm)
    want = verl_policy_loss(torch, *t, tm.double(), 0.2, 0.28, 3.0)
    close(got.item(), want.item())

    # OpenRLHF's PolicyLoss form of the same loss: -where(A < 0, max(min(s1, s2), cA), min(s1, s2))
    ratio = torch.exp(t[0] - t[1])  # |log-ratio| < 20 here, so the clamp is inactive
    s1 = ratio * t[2]
    s2 = ratio.clamp(1 - 0.2, 1 + 0.28) * t[2]
    clip1 = torch.min(s1, s2)
    per_token = -torch.where(t[2] < 0, torch.max(clip1, 3.0 * t[2]), clip1)
    close(got.item(), ((per_token * tm).sum() / tm.sum()).item())

    x = torch.tensor(lp, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: rl.ppo_clip_loss(a, t[1], t[2], dual_clip=2.0, mask=tm), (x,))
    # gradients equal verl's too
    got = rl.ppo_clip_loss(x, t[1], t[2], clip_eps=0.2, dual_clip=3.0, mask=tm)
    (g,) = torch.autograd.grad(got, x)
    x2 = torch.tensor(lp, requires_grad=True)
    (g2,) = torch.autograd.grad(verl_policy_loss(torch, x2, t[1], t[2], tm.double(), 0.2, 0.2,
                                                 3.0), x2)
    np.testing.assert_allclose(g.numpy(), g2.numpy(), rtol=1e-12, atol=1e-15)


def test_ppo_torch_padding_inf_and_dtype(rng):
    torch = pytest.importorskip("torch")
    lp, old, adv = inputs(rng, (2, 6))
    mask = np.ones((2, 6), bool)
    mask[:, 4:] = False
    x = torch.tensor(np.where(mask, lp, -np.inf), dtype=torch.float32, requires_grad=True)
    got = rl.ppo_clip_loss(x, torch.tensor(old, dtype=torch.float32),
                           torch.tensor(adv, dtype=torch.float32), mask=torch.tensor(mask))
    assert got.dtype == torch.float32
    exact = ref_ppo(lp.astype(np.float32), old.astype(np.float32), adv.astype(np.float32),
                    0.2, 0.2, None, mask)
    close(got.item(), exact, tol=RLHF_TOL32)
    got.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, 4:] == 0).all()
    empty = rl.ppo_clip_loss(x, x.detach(), x.detach(), mask=torch.zeros(2, 6, dtype=torch.bool))
    assert empty.item() == 0.0
