"""Preference losses: DPO + NLL, the Llama-2 margin loss and the Bradley–Terry ranking loss.

Every ``-log sigmoid(z)`` here is evaluated as ``softplus(-z) = logaddexp(0, -z)``: finite and
accurate for any |z| (``log(sigmoid(z))`` underflows to log 0 = -inf below z ≈ -745 in float64,
and its gradient with it).
"""
from __future__ import annotations

import operator

from array_api_compat import device

from ._array import (broadcast_shape, check_reduction, finish, prepare, real, reduce, softplus)


def dpo_nll_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, *, beta=0.1, alpha=1.0, reduction="mean"):
    r"""DPO loss plus a length-normalised NLL on the chosen response (the seed's eq. 8).

    .. math::

        \ell = -\log\sigma\Big(\beta\big[(\log P_\theta(w) - \log P_{ref}(w))
               - (\log P_\theta(l) - \log P_{ref}(l))\big]\Big)
               - \alpha\,\frac{\log P_\theta(w)}{|w|}

    The first term is TRL's ``DPOTrainer`` sigmoid loss; the second is its ``rpo_alpha`` term
    (the chosen response's mean token NLL), here from summed log-probs and ``|w|``.

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps : array_like
        Summed sequence log-probs ``log P(w)``, ``log P(l)`` under the policy and the reference;
        shapes broadcast.
    chosen_lengths : array_like
        ``|w|``, the number of tokens of each chosen response; every entry > 0.
    beta : float
        β > 0.
    alpha : float
        α ≥ 0 (0 gives plain DPO).
    reduction : {"mean", "sum", "none"}
        ``"mean"`` of an empty batch is 0.

    Returns
    -------
    numpy.float64, ndarray or torch.Tensor
    """
    beta = real("beta", beta, min_value=0.0, strict_min=True)
    alpha = real("alpha", alpha, min_value=0.0)
    check_reduction(reduction)
    p = prepare({"policy_chosen_logps": policy_chosen_logps,
                 "policy_rejected_logps": policy_rejected_logps,
                 "ref_chosen_logps": ref_chosen_logps,
                 "ref_rejected_logps": ref_rejected_logps,
                 "chosen_lengths": chosen_lengths})
    xp = p.xp
    pc, pr, rc, rr, n = p.arrays
    broadcast_shape(dict(zip(("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                              "ref_rejected_logps", "chosen_lengths"), p.arrays)))
    if bool(xp.any(~(n > 0))):
        raise ValueError("chosen_lengths must all be > 0 (the chosen response's token count)")
    # Each log-ratio is formed on one sequence first: policy and reference log-probs of the same
    # response are close, so (pc - rc) - (pr - rr) loses less than (pc - pr) - (rc - rr) when
    # the sums themselves are large.
    z = beta * ((pc - rc) - (pr - rr))
    loss = softplus(xp, -z) - alpha * (pc / n)
    return finish(p, reduce(xp, loss, reduction))


def margin_reward_loss(chosen_rewards, rejected_rewards, margin=0.0, reduction="mean"):
    r"""Llama-2 reward-model loss :math:`-\log\sigma(r_c - r_r - m)` (binary ranking with margin).

    Parameters
    ----------
    chosen_rewards, rejected_rewards : array_like or torch.Tensor
        Reward-model scores of the preferred and the other response; shapes broadcast.
    margin : float or array_like
        m, a constant or one per pair (Llama 2 uses a larger margin for clearer preferences);
        0 gives the InstructGPT pairwise loss.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` of an empty batch is 0.

    Returns
    -------
    numpy.float64, ndarray or torch.Tensor
    """
    check_reduction(reduction)
    p = prepare({"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                 "margin": margin})
    xp = p.xp
    rc, rr, m = p.arrays
    broadcast_shape({"chosen_rewards": rc, "rejected_rewards": rr, "margin": m})
    return finish(p, reduce(xp, softplus(xp, -(rc - rr - m)), reduction))


def ranking_pairs(k):
    """The (winner, loser) index pairs of a ranking of ``k`` responses, best first.

    ``ranking_pairs(3) == [(0, 1), (0, 2), (1, 2)]``: all k(k−1)/2 pairs ``i < j``.

    Parameters
    ----------
    k : int
        Number of ranked responses, ≥ 2.

    Returns
    -------
    list of tuple of int
    """
    if isinstance(k, bool):
        raise TypeError("k must be an integer, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if k < 2:
        raise ValueError(f"a ranking needs k >= 2 responses, got {k}")
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def bradley_terry_loss(ranked_rewards, reduction="mean"):
    r"""Bradley–Terry loss of rankings: the mean over all pairs of :math:`-\log\sigma(r_i - r_j)`.

    For a ranking of K responses, best first, every pair ``i < j`` (:func:`ranking_pairs`)
    contributes one term, as in InstructGPT's reward-model loss:

    .. math:: \ell = \binom{K}{2}^{-1} \sum_{i<j} -\log\sigma(r_i - r_j)

    Parameters
    ----------
    ranked_rewards : array_like or torch.Tensor
        ``[..., K]`` rewards of each ranking's responses in rank order (best first), K ≥ 2.
    reduction : {"mean", "sum", "none"}
        Over the rankings: ``"none"`` returns the per-ranking loss ``[...]``; ``"mean"`` of an
        empty batch is 0.

    Returns
    -------
    numpy.float64, ndarray or torch.Tensor
    """
    check_reduction(reduction)
    p = prepare({"ranked_rewards": ranked_rewards})
    xp = p.xp
    (r,) = p.arrays
    if r.ndim == 0:
        raise ValueError("ranked_rewards must be at least 1-D [..., K]")
    pairs = ranking_pairs(int(r.shape[-1]))
    winners = xp.asarray([i for i, _ in pairs], device=device(r))
    losers = xp.asarray([j for _, j in pairs], device=device(r))
    diff = xp.take(r, winners, axis=-1) - xp.take(r, losers, axis=-1)
    per_ranking = xp.sum(softplus(xp, -diff), axis=-1) / len(pairs)
    return finish(p, reduce(xp, per_ranking, reduction))
