"""KL to a reference policy from per-token log-probs, and the KL-shaped rewards built on it."""
from __future__ import annotations

import math

import numpy as np

from ._array import broadcast_shape, finish, masked, prepare, real

ESTIMATORS = ("k1", "abs", "k2", "k3")


def _check_estimator(estimator) -> None:
    if estimator == "full":
        raise ValueError(
            'estimator "full" is the exact KL over the vocabulary and needs both sets of logits; '
            "use ptx_numba.kl_penalty(logits, ref_logits, tokens, estimator='full'). "
            f"From log-probs alone the valid estimators are {ESTIMATORS}"
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators are {ESTIMATORS}")


def _check_clamp(clamp):
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp must be None or a pair (lo, hi), got {clamp!r}")
    lo = real("clamp[0]", clamp[0], finite=False)
    hi = real("clamp[1]", clamp[1], finite=False)
    if not lo <= hi:
        raise ValueError(f"clamp must have lo <= hi, got ({lo}, {hi})")
    return lo, hi


# Below |r| = 0.01 k3 is evaluated from its Taylor series r^2 (1/2 - r/6 + ... - r^5/5040):
# expm1(-r) + r is accurate only to about eps*|r| absolutely, i.e. 2*eps/|r| relative to
# k3 ~ r^2/2 (2e-9 at r = 1e-7), while the series' first omitted term is r^6/20160 relative
# (5e-17 at r = 0.01). Above 0.01 the expm1 form is within 4e-14 relative.
_K3_SERIES_BELOW = 0.01
_K3_COEFFS = tuple((-1) ** k / math.factorial(k + 2) for k in range(6))


def _k3(xp, r):
    """k3 = exp(-r) - 1 + r, accurate to ~1e-13 relative for every r (see above)."""
    small = xp.abs(r) < _K3_SERIES_BELOW
    rs = xp.where(small, r, xp.zeros_like(r))  # the series only ever sees small r
    poly = xp.full_like(r, _K3_COEFFS[-1])
    for c in _K3_COEFFS[-2::-1]:
        poly = poly * rs + c
    # Below r = -709 the true value exceeds float64 and becomes inf (no NumPy overflow
    # warning: inf is the answer); at r = -inf the sum would be inf - inf, so that limit is
    # written out (and r = -inf never reaches the sum).
    neg_inf = r == -math.inf
    rb = xp.where(neg_inf, xp.zeros_like(r), r)
    with np.errstate(over="ignore"):
        big = xp.expm1(-rb) + rb
    big = xp.where(neg_inf, xp.full_like(r, math.inf), big)
    return xp.where(small, rs * rs * poly, big)


def _estimate(xp, logp, ref, estimator, clamp):
    r = logp - ref
    if estimator == "k1":
        est = r
    elif estimator == "abs":
        est = xp.abs(r)
    elif estimator == "k2":
        est = r * r / 2
    else:
        est = _k3(xp, r)
    if clamp is not None:
        est = xp.clip(est, clamp[0], clamp[1])
    return est


def kl_estimate(logprobs, ref_logprobs, estimator="k1", *, clamp=None):
    r"""Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs.

    With :math:`r = \log\pi(y_t) - \log\pi_{ref}(y_t)` (tokens sampled from π):
    ``k1`` = r, ``abs`` = |r|, ``k2`` = r²/2, ``k3`` = exp(−r) − 1 + r, the estimators of
    Schulman's "Approximating KL divergence" as used by TRL, OpenRLHF (``compute_approx_kl``) and
    verl (``kl_penalty``). k1 is unbiased but can be negative; k3 is unbiased and ≥ 0.

    Parameters
    ----------
    logprobs, ref_logprobs : array_like or torch.Tensor
        Log-probs of the same tokens under the policy and the reference; shapes broadcast.
    estimator : {"k1", "abs", "k2", "k3"}
        The exact ``"full"`` KL needs both logit sets: use :func:`ptx_numba.kl_penalty`.
    clamp : (lo, hi) or None
        Clamp each per-token estimate into ``[lo, hi]`` (verl clamps k3 into [-10, 10]).

    Returns
    -------
    ndarray or torch.Tensor
        The broadcast shape; float64 for NumPy, the inputs' dtype and device for tensors.

    Notes
    -----
    k3 overflows to ``inf`` for r < −709 (its true value exceeds the float64 range); pass
    ``clamp`` to bound it. A token at −inf policy log-prob gives k1 = −inf and k3 = inf.
    """
    _check_estimator(estimator)
    clamp = _check_clamp(clamp)
    p = prepare({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    logp, ref = p.arrays
    broadcast_shape({"logprobs": logp, "ref_logprobs": ref})
    return finish(p, _estimate(p.xp, logp, ref, estimator, clamp))


def log_ratio_penalty(logprobs, ref_logprobs, mask=None):
    r"""Sequence log-ratio :math:`\sum_t (\log\pi(y_t) - \log\pi_{ref}(y_t))` over the last axis.

    The seed's log-ratio penalty: exactly 0 where both policies give the same log-probs.

    Parameters
    ----------
    logprobs, ref_logprobs : array_like or torch.Tensor
        ``[..., T]`` per-token log-probs; shapes broadcast.
    mask : array_like, optional
        Valid tokens (nonzero = valid), broadcast against the log-probs; padding contributes 0
        whatever its values (also ±inf or NaN).

    Returns
    -------
    ndarray or torch.Tensor
        Shape ``[...]`` (the broadcast shape without its last axis); 0 for an empty last axis.
    """
    p = prepare({"logprobs": logprobs, "ref_logprobs": ref_logprobs}, {"mask": mask})
    xp = p.xp
    logp, ref, m = p.arrays
    shape = broadcast_shape({"logprobs": logp, "ref_logprobs": ref, "mask": m})
    if len(shape) == 0:
        raise ValueError("log_ratio_penalty needs at least 1-D log-probs [..., T]")
    if m is not None:
        m = xp.broadcast_to(m, shape)
        logp = masked(xp, xp.broadcast_to(logp, shape), m)
        ref = masked(xp, xp.broadcast_to(ref, shape), m)
    return finish(p, xp.sum(masked(xp, logp - ref, m), axis=-1))


def kl_shaped_reward(reward, kl, kl_coef):
    r"""The KL-shaped reward :math:`r - \lambda\,\mathrm{KL}`; e.g. ``(2.5, 3.0, 0.1)`` gives 2.2.

    Parameters
    ----------
    reward, kl : array_like or torch.Tensor
        Reward-model scores and KL values; shapes broadcast.
    kl_coef : float
        λ ≥ 0, finite.

    Returns
    -------
    numpy.float64, ndarray or torch.Tensor
    """
    lam = real("kl_coef", kl_coef, min_value=0.0)
    p = prepare({"reward": reward, "kl": kl})
    r, k = p.arrays
    broadcast_shape({"reward": r, "kl": k})
    return finish(p, r - lam * k)


def token_level_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1",
                        clip=None):
    r"""Per-token PPO rewards: −λ·KL at each valid token plus the score at the last valid one.

    :math:`R_t = -\lambda\,\widehat{KL}_t + [t = t_{last}]\,\mathrm{clip}(s, -c, c)`, the
    convention of OpenRLHF's ``compute_reward`` and TRL's PPO trainer (the sequence score is a
    terminal reward credited to the final response token).

    Parameters
    ----------
    scores : array_like or torch.Tensor
        ``[...]`` one reward-model score per sequence.
    logprobs, ref_logprobs : array_like or torch.Tensor
        ``[..., T]`` per-token log-probs under the policy and the reference.
    mask : array_like or torch.Tensor
        ``[..., T]`` valid response tokens (nonzero = valid); padding may sit anywhere (left,
        right or inside), the "last valid token" is the highest valid position.
    kl_coef : float
        λ ≥ 0, finite.
    estimator : {"k1", "abs", "k2", "k3"}
        Per-token KL estimator (:func:`kl_estimate`).
    clip : float, optional
        c > 0: the score is clamped into [−c, c] first (OpenRLHF's ``reward_clip_range`` with a
        symmetric range).

    Returns
    -------
    ndarray or torch.Tensor
        ``[..., T]``; 0 at every padded position. A sequence with no valid token gets an
        all-zero row: its score is dropped, as there is no action to credit it to (OpenRLHF
        would write it at position T−1, which its loss then masks out; the effect is the same).
    """
    lam = real("kl_coef", kl_coef, min_value=0.0)
    _check_estimator(estimator)
    if clip is not None:
        clip = real("clip", clip, min_value=0.0, strict_min=True, finite=False)
    p = prepare({"scores": scores, "logprobs": logprobs, "ref_logprobs": ref_logprobs},
                {"mask": mask})
    xp = p.xp
    s, logp, ref, m = p.arrays
    if m is None:
        raise TypeError("mask must be an array, got None")
    shape = tuple(logp.shape)
    if len(shape) == 0:
        raise ValueError("logprobs must be at least 1-D [..., T]")
    if tuple(ref.shape) != shape or tuple(m.shape) != shape:
        raise ValueError(f"logprobs {shape}, ref_logprobs {tuple(ref.shape)} and mask "
                         f"{tuple(m.shape)} must have the same shape")
    if tuple(s.shape) != shape[:-1]:
        raise ValueError(f"scores must have shape logprobs.shape[:-1] = {shape[:-1]}, "
                         f"got {tuple(s.shape)}")
    if clip is not None:
        s = xp.clip(s, -clip, clip)
    # Padding is zeroed before the estimate so that its values (often -inf) never reach exp().
    est = _estimate(xp, masked(xp, logp, m), masked(xp, ref, m), estimator, None)
    rewards = masked(xp, -lam * est, m)
    # The last valid token is the valid one with no valid token after it.
    after = xp.flip(xp.cumulative_sum(xp.astype(xp.flip(m, axis=-1), xp.int64), axis=-1), axis=-1)
    last = m & (after == 1)
    rewards = rewards + masked(xp, xp.broadcast_to(s[..., None], shape), last)
    return finish(p, rewards)
