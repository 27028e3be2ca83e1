"""ptx_numba.rlhf preference losses (DPO+NLL, margin, Bradley–Terry) vs SciPy float64 and torch."""
import itertools

import numpy as np
import pytest
from scipy.special import log_expit

import ptx_numba.rlhf as rl
from exact import as_f64, rel_error

#: ptx_numba.rlhf's own precision, not the kernels' contract: its float64 formulas agree with SciPy
#: to 1e-10; float32 inputs (torch) to RLHF_TOL32, float32 rounding.
RLHF_TOL64, RLHF_TOL32 = 1e-10, 2e-5


def close(got, exact, tol=RLHF_TOL64):
    """Finite, and within ``tol`` relative to max(1, |exact|)."""
    got, exact = as_f64(got), as_f64(exact)
    assert got.shape == exact.shape
    assert np.isfinite(got).all()
    err = rel_error(got, exact)
    assert err <= tol, err


def reduced(x, reduction):
    x = np.asarray(x, dtype=np.float64)
    return {"none": x, "sum": x.sum(), "mean": x.mean() if x.size else 0.0}[reduction]


def dpo_inputs(rng, shape):
    # summed sequence log-probs of long responses: large and negative
    pc, pr = -rng.uniform(50, 3e4, size=shape), -rng.uniform(50, 3e4, size=shape)
    rc = pc + rng.normal(scale=3.0, size=shape)
    rr = pr + rng.normal(scale=3.0, size=shape)
    n = rng.integers(1, 400, size=shape)
    return pc, pr, rc, rr, n


def ref_dpo(pc, pr, rc, rr, n, beta, alpha):
    return -log_expit(beta * ((pc - rc) - (pr - rr))) - alpha * pc / n


# ---------------------------------------------------------------- dpo_nll_loss

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dpo_nll_matches_scipy(rng, reduction):
    args = dpo_inputs(rng, (13,))
    got = rl.dpo_nll_loss(*args, beta=0.3, alpha=0.7, reduction=reduction)
    close(got, reduced(ref_dpo(*args, 0.3, 0.7), reduction))


def test_dpo_is_plain_dpo_at_alpha_zero_and_broadcasts(rng):
    pc, pr, rc, rr, n = dpo_inputs(rng, (4, 3))
    got = rl.dpo_nll_loss(pc, pr, rc, rr, 7, beta=0.1, alpha=0.0, reduction="none")
    close(got, -log_expit(0.1 * ((pc - pr) - (rc - rr))))  # TRL's grouping of the same logits
    # a scalar reference log-prob broadcasts
    close(rl.dpo_nll_loss(pc, pr, -100.0, -100.0, n, reduction="none"),
          ref_dpo(pc, pr, -100.0, -100.0, n, 0.1, 1.0))


def test_dpo_extreme_margins_stay_finite():
    pc = np.array([0.0, -2e5])
    pr = np.array([-2e5, 0.0])
    got = rl.dpo_nll_loss(pc, pr, np.zeros(2), np.zeros(2), [1, 1], beta=1.0, alpha=0.0,
                          reduction="none")
    close(got, [0.0, 2e5])


def test_dpo_empty_and_errors():
    e = np.zeros(0)
    assert rl.dpo_nll_loss(e, e, e, e, e) == 0.0
    assert rl.dpo_nll_loss(e, e, e, e, e, reduction="none").shape == (0,)
    one = np.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        rl.dpo_nll_loss(one, one, one, one, [3, 0])
    with pytest.raises(ValueError, match="beta"):
        rl.dpo_nll_loss(one, one, one, one, [1, 1], beta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        rl.dpo_nll_loss(one, one, one, one, [1, 1], alpha=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        rl.dpo_nll_loss(one, one, one, one, [1, 1], reduction="avg")
    with pytest.raises(ValueError, match="broadcast"):
        rl.dpo_nll_loss(one, np.zeros(3), one, one, [1, 1])


# ---------------------------------------------------------------- margin_reward_loss

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_margin_loss_matches_scipy(rng, reduction):
    rc, rr = rng.normal(scale=3, size=(5, 3)), rng.normal(scale=3, size=(5, 3))
    m = rng.choice([0.0, 1/3, 2/3, 1.0], size=(5, 3))  # Llama 2's per-pair margins
    close(rl.margin_reward_loss(rc, rr, m, reduction), reduced(-log_expit(rc - rr - m), reduction))
    close(rl.margin_reward_loss(rc, rr, reduction=reduction),
          reduced(-log_expit(rc - rr), reduction))


def test_margin_loss_large_and_empty():
    got = rl.margin_reward_loss([1e4, -1e4, 3e4], [-1e4, 1e4, 3e4], reduction="none")
    close(got, [0.0, 2e4, np.log(2)])
    assert rl.margin_reward_loss([], []) == 0.0
    assert rl.margin_reward_loss([], [], reduction="sum") == 0.0


# ---------------------------------------------------------------- Bradley–Terry

def test_ranking_pairs():
    assert rl.ranking_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert rl.ranking_pairs(2) == [(0, 1)]
    for k in (4, 7):
        assert rl.ranking_pairs(k) == list(itertools.combinations(range(k), 2))
        assert len(rl.ranking_pairs(k)) == k * (k - 1) // 2
    assert rl.ranking_pairs(np.int64(3)) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="k >= 2"):
        rl.ranking_pairs(1)
    with pytest.raises(TypeError):
        rl.ranking_pairs(3.0)
    with pytest.raises(TypeError):
        rl.ranking_pairs(True)


def ref_bt(r):
    r = np.asarray(r, dtype=np.float64)
    out = np.empty(r.shape[:-1])
    for idx in np.ndindex(out.shape):
        terms = [-log_expit(r[idx + (i,)] - r[idx + (j,)])
                 for i, j in itertools.combinations(range(r.shape[-1]), 2)]
        out[idx] = sum(terms) / len(terms)
    return out


def test_bt_three_responses_give_three_terms(rng):
    r = rng.normal(size=3)
    terms = [-log_expit(r[0] - r[1]), -log_expit(r[0] - r[2]), -log_expit(r[1] - r[2])]
    assert len(rl.ranking_pairs(3)) == len(terms) == 3
    close(rl.bradley_terry_loss(r), sum(terms) / 3)
    # K = 2 is the pairwise (margin-free) loss
    close(rl.bradley_terry_loss(r[:2]), rl.margin_reward_loss(r[0], r[1]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_bt_matches_scipy(rng, k, reduction):
    r = rng.normal(scale=2, size=(2, 3, 2 * k))[..., ::2]  # strided
    r0 = r.copy()
    close(rl.bradley_terry_loss(r, reduction), reduced(ref_bt(r), reduction))
    np.testing.assert_array_equal(r, r0)


def test_bt_large_empty_errors():
    close(rl.bradley_terry_loss([[1e4, 0.0, -1e4], [-1e4, 0.0, 1e4]], "none"),
          [0.0, (1e4 + 2e4 + 1e4) / 3])
    assert rl.bradley_terry_loss(np.zeros((0, 4))) == 0.0
    assert rl.bradley_terry_loss(np.zeros((0, 4)), "none").shape == (0,)
    with pytest.raises(ValueError, match="k >= 2"):
        rl.bradley_terry_loss(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="1-D"):
        rl.bradley_terry_loss(1.0)
    with pytest.raises(ValueError, match="reduction"):
        rl.bradley_terry_loss(np.zeros((3, 2)), "max")


# ---------------------------------------------------------------- torch

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_preference_losses_torch(rng, reduction):
    torch = pytest.importorskip("torch")
    args = dpo_inputs(rng, (6,))
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=i < 4) for i, a in enumerate(args)]
    got = rl.dpo_nll_loss(*t, beta=0.2, alpha=0.5, reduction=reduction)
    close(got.detach().numpy(), reduced(ref_dpo(*args, 0.2, 0.5), reduction))
    # TRL's expression in torch: -logsigmoid(beta * logits) + alpha * NLL per token
    logits = (t[0] - t[1]) - (t[2] - t[3])
    trl = -torch.nn.functional.logsigmoid(0.2 * logits) - 0.5 * t[0] / t[4]
    close(got.detach().numpy(), reduced(trl.detach().numpy(), reduction))
    small = [torch.tensor(rng.normal(size=4), requires_grad=True) for _ in range(4)]
    n = torch.tensor([3.0, 1.0, 8.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: rl.dpo_nll_loss(a, b, c, d, n, beta=0.7, reduction=reduction), small)

    rc, rr = (torch.tensor(rng.normal(size=(3, 4)), requires_grad=True) for _ in range(2))
    m = torch.tensor(rng.uniform(0, 1, size=(3, 4)))
    assert torch.autograd.gradcheck(
        lambda a, b: rl.margin_reward_loss(a, b, m, reduction), (rc, rr))
    close(rl.margin_reward_loss(rc, rr, m, reduction).detach().numpy(),
          reduced(-log_expit((rc - rr - m).detach().numpy()), reduction))

    r = torch.tensor(rng.normal(size=(2, 4)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rl.bradley_terry_loss(x, reduction), (r,))
    close(rl.bradley_terry_loss(r, reduction).detach().numpy(),
          reduced(ref_bt(r.detach().numpy()), reduction))


def test_preference_torch_dtype_and_large_gradients(rng):
    torch = pytest.importorskip("torch")
    r = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 0.0, 1e4]], dtype=torch.float32,
                     requires_grad=True)
    loss = rl.bradley_terry_loss(r)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(r.grad).all()
    # d/dr of the second ranking's mean over 3 saturated pairs: -1/3 per losing pair, halved
    # by the batch mean
    np.testing.assert_allclose(r.grad[1].numpy(), [-2 / 6, 0.0, 2 / 6], atol=1e-6)
    rc = torch.tensor(rng.normal(size=5), dtype=torch.float32)
    got = rl.margin_reward_loss(rc, rc.flip(0), 0.5, "none")
    assert got.dtype == torch.float32
    close(got.numpy(), -log_expit(rc.double().numpy() - rc.flip(0).double().numpy() - 0.5),
          tol=RLHF_TOL32)
