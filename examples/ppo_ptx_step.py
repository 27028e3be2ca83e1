"""One PPO + PTX training step on a tiny language model, with torch and ``ptx_numba.torch``.

The step an RLHF trainer repeats: sample responses from the policy, score them with a reward
model, shape the reward with a KL penalty to the frozen reference policy, take the PPO clipped
surrogate on the token log-probs, add the pre-training (PTX) cross entropy, and update.

    python examples/ppo_ptx_step.py

Needs PyTorch (the CPU wheel is enough: ``pip install torch --index-url
https://download.pytorch.org/whl/cpu``); without it, it says so and exits.
"""
from __future__ import annotations

import copy
import importlib
import sys

REQUIRED = {
    "ptx_numba.torch": ("PTXLoss", "token_logprobs", "kl_penalty"),
    "ptx_numba.rlhf": ("token_level_rewards", "ppo_clip_loss"),
}


def missing_requirements() -> str | None:
    """Why this example cannot run here, or None."""
    try:
        importlib.import_module("torch")
    except ImportError:
        return "PyTorch is not installed"
    for module_name, names in REQUIRED.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return f"{module_name} cannot be imported ({exc})"
        absent = [n for n in names if not hasattr(module, n)]
        if absent:
            return f"{module_name} has no {', '.join(absent)}"
    return None


def main() -> int:
    reason = missing_requirements()
    if reason:
        print(f"skipped: {reason}")
        return 0

    import torch

    import ptx_numba.torch as pnt
    from ptx_numba import rlhf

    torch.manual_seed(0)
    V, D, B, T = 64, 16, 4, 8  # vocabulary, width, sequences, response length
    policy = torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Linear(D, V))
    reference = copy.deepcopy(policy).requires_grad_(False)  # the frozen starting point
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    good_token = 7  # the toy reward model likes this token

    # 1. Sample responses token by token (a bigram model: each token depends on the previous one).
    with torch.no_grad():
        tokens = torch.zeros(B, T + 1, dtype=torch.long)
        for t in range(T):
            probs = torch.softmax(policy(tokens[:, t]), dim=-1)
            tokens[:, t + 1] = torch.multinomial(probs, 1).squeeze(-1)
    inputs, responses = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False  # the first response ended early

    # 2. Reward, shaped by the KL to the reference; advantages from the reward-to-go.
    with torch.no_grad():
        scores = (responses == good_token).float().sum(-1)  # one score per sequence
        old_logp = pnt.token_logprobs(policy(inputs), responses)
        ref_logp = pnt.token_logprobs(reference(inputs), responses)
        rewards = rlhf.token_level_rewards(scores, old_logp, ref_logp, mask, kl_coef=0.05)
        returns = rewards.flip(-1).cumsum(-1).flip(-1)
        valid = returns[mask]
        advantages = torch.where(mask, (returns - valid.mean()) / (valid.std() + 1e-8), 0.0)

    # 3. The PPO loss on the current policy, plus the PTX term on a pre-training batch.
    logits = policy(inputs)
    logp = pnt.token_logprobs(logits, responses)
    rl_loss = rlhf.ppo_clip_loss(logp, old_logp, advantages, clip_eps=0.2, mask=mask)

    pretrain = torch.randint(0, V, (B, T + 1))
    ptx_labels = pretrain[:, 1:].clone()
    ptx_labels[1, -3:] = -100  # padding
    loss_fn = pnt.PTXLoss(beta=0.1, ignore_index=-100)
    total, ptx, ce = loss_fn(rl_loss, policy(pretrain[:, :-1]), ptx_labels)

    before = [p.detach().clone() for p in policy.parameters()]
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    kl = pnt.kl_penalty(logits.detach(), reference(inputs), responses, estimator="k3")
    rl_loss, total, ptx, ce = (float(x.detach()) for x in (rl_loss, total, ptx, ce))
    # At the first step the policy is the reference and the sampler: ratio 1, KL 0, and the
    # whitened advantages average to 0, so the PPO loss starts at 0.
    print(f"rl_loss {rl_loss:.6f}  ptx {ptx:.6f}  ce {ce:.6f}  total {total:.6f}")
    print(f"mean k3 KL to the reference {float(kl[mask].mean()):.3e}, reward {scores.tolist()}")

    # What the step must satisfy: the PTX decomposition, and a real update of the policy.
    assert abs(total - (rl_loss + 0.1 * ce)) < 1e-5, "total != rl_loss + beta * ce"
    assert ce > 0.0 and total == total
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters())), "no update"
    print("ok: total = rl_loss + beta * ce, and the policy was updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
