"""The PPO clipped surrogate (with asymmetric and dual clipping), averaged over valid tokens."""
from __future__ import annotations

from ._array import broadcast_shape, finish, masked, prepare, real, size

# The log-ratio is clamped before exp() so that a stale or masked token cannot overflow the
# ratio; the same +-20 as verl's compute_policy_loss_vanilla.
LOG_RATIO_LIMIT = 20.0


def ppo_clip_loss(logprobs, old_logprobs, advantages, *, clip_eps=0.2, clip_eps_high=None,
                  dual_clip=None, mask=None):
    r"""PPO-clip policy loss, the mean over valid tokens.

    With :math:`\rho_t = \exp(\mathrm{clamp}(\log\pi(y_t) - \log\pi_{old}(y_t), -20, 20))`:

    .. math::

        \ell_t = \max\big(-\rho_t A_t,\;
                          -\mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon_{high}) A_t\big)

    (that is :math:`-\min(\rho A, \mathrm{clip}(\rho)A)`), and with dual clipping
    (c > 1, Ye et al. 2020) :math:`\ell_t \leftarrow \min(\ell_t, -cA_t)` where :math:`A_t < 0`.
    This is the definition of verl's ``compute_policy_loss`` (``clip_ratio_low``,
    ``clip_ratio_high``, ``clip_ratio_c``) and OpenRLHF's ``PolicyLoss`` (``clip_eps_low``,
    ``clip_eps_high``, ``dual_clip``), with verl's token-mean aggregation.

    Parameters
    ----------
    logprobs, old_logprobs : array_like or torch.Tensor
        ``[...]`` per-token log-probs under the current policy and the one that sampled the
        tokens (pass the latter detached); shapes broadcast.
    advantages : array_like or torch.Tensor
        Per token, or broadcastable (``[B, 1]`` for one advantage per sequence as in GRPO).
    clip_eps : float
        ε in (0, 1): the ratio's lower bound is 1 − ε.
    clip_eps_high : float, optional
        ε_high > 0 for the upper bound 1 + ε_high (DAPO's clip-higher); defaults to ε.
    dual_clip : float, optional
        c > 1; None disables dual clipping.
    mask : array_like, optional
        Valid tokens (nonzero = valid); padded positions are ignored whatever their values.

    Returns
    -------
    numpy.float64 or torch.Tensor
        A scalar: the sum over valid tokens divided by their count; 0 when there is none.
    """
    eps = real("clip_eps", clip_eps, min_value=0.0, strict_min=True)
    if not eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {eps}")
    eps_high = eps if clip_eps_high is None else real(
        "clip_eps_high", clip_eps_high, min_value=0.0, strict_min=True)
    if dual_clip is not None:
        dual_clip = real("dual_clip", dual_clip, min_value=1.0, strict_min=True)
    p = prepare({"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages},
                {"mask": mask})
    xp = p.xp
    logp, old, adv, m = p.arrays
    shape = broadcast_shape({"logprobs": logp, "old_logprobs": old, "advantages": adv,
                             "mask": m})
    logp, old, adv = (xp.broadcast_to(a, shape) for a in (logp, old, adv))
    if m is not None:
        m = xp.broadcast_to(m, shape)
        # Zero the padding first: a -inf log-prob there must not reach the ratio or its gradient.
        logp, old, adv = (masked(xp, a, m) for a in (logp, old, adv))
    ratio = xp.exp(xp.clip(logp - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    loss = xp.maximum(-adv * ratio, -adv * xp.clip(ratio, 1.0 - eps, 1.0 + eps_high))
    if dual_clip is not None:
        loss = xp.where(adv < 0, xp.minimum(loss, -dual_clip * adv), loss)
    loss = masked(xp, loss, m)
    count = xp.sum(xp.astype(m, loss.dtype)) if m is not None else float(max(size(loss), 1))
    if m is not None:
        count = xp.maximum(count, xp.ones_like(count))
    return finish(p, xp.sum(loss) / count)
