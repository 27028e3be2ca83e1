"""The log-prob family of the RLHF regularizers: :func:`token_logprobs` (with entropy),
:func:`entropy`, :func:`kl_divergence` and :func:`kl_penalty`, each one fused row pass over the
logits (two aligned logit sets for the KL), finished in float64.

Shift-invariant forms throughout (:mod:`ptx_numba._finish`): ``H = log s - t/s`` rather than
``lse - sum p z``, and the exact KL from raw logits with online rescaling, never N x V log-probs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _finish, _ops, config
from ._rowpass import StatsSpec
from ._validate import check_ignore_index, prepare

#: ``kl_penalty`` estimators with ``r = logp - ref_logp`` per token.
ESTIMATORS = ("k1", "abs", "k2", "k3", "full")


def check_estimator(estimator: Any) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators are {ESTIMATORS}")
    return estimator


def forward(logits, tokens, *, ref_logits=None, temperature=1.0, ignore_index=config.DEFAULT_IGNORE_INDEX,
            entropy=False, full_kl=False, backend="auto"):
    """The row pass behind this family: ``(batch, stats, backend name, spec)``."""
    inv_t = _ops.check_temperature(temperature)
    if tokens is not None:
        ignore_index = check_ignore_index(ignore_index)
    batch = prepare(logits, tokens, ignore_index=ignore_index, other=ref_logits, labels_name="tokens")
    spec = StatsSpec(inv_temperature=inv_t, target=tokens is not None, entropy=entropy,
                     pair=ref_logits is not None and full_kl)
    if ref_logits is not None and not full_kl:  # the reference log-prob needs the second set's stats
        spec = StatsSpec(inv_temperature=inv_t, target=True, entropy=entropy, pair=True)
    st, name = _ops.stats(batch, spec, backend)
    return batch, st, name, spec


def backward(logits, tokens, saved: _ops.Saved, *, ref_logits=None, g_logp=None, g_entropy=None,
             g_kl=None, out=None):
    """``sum_i (g_logp_i dlogp_i + g_entropy_i dH_i + g_kl_i dKL_i) / d logits`` (host or device).

    ``saved`` comes from :func:`forward` (its stats; the logits are read again). Gradients do not
    flow to ``ref_logits``.
    """
    batch = prepare(logits, tokens, ignore_index=saved.options["ignore_index"], other=ref_logits,
                    labels_name="tokens")
    coef = _finish.logprob_coef(saved.stats, g_logp, g_entropy, g_kl)
    if batch.on_device:
        grad = _ops.device_out(batch, out)
    else:
        shape = batch.batch_shape + (batch.vocab,)
        grad = _ops.check_out(out, logits, tokens, _ops.grad_dtype_of(batch, logits), shape)
    _ops.grad(batch, saved.spec, saved.stats, coef, grad, saved.backend)
    return grad


def token_logprobs(logits: Any, tokens: Any, *, temperature: float = 1.0,
                   ignore_index: int = config.DEFAULT_IGNORE_INDEX, return_entropy: bool = False,
                   backend: str = "auto"):
    """Log-probability of each token under ``softmax(logits / temperature)``.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        As in :func:`ptx_numba.cross_entropy`.
    tokens : array_like of int, shape logits.shape[:-1]
        Token ids in ``[0, V)`` or ``ignore_index``.
    temperature : float > 0
        Divides the logits first (score at the temperature you sampled at).
    ignore_index : int
        Positions with this token give 0.0.
    return_entropy : bool
        Also return the entropy of each position's distribution, from the same single pass.
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    logp : ndarray shaped like ``tokens``
        float64 for float64 logits, else float32. A token at a ``-inf`` logit gives ``-inf``.
    entropy : ndarray shaped like ``tokens``, if ``return_entropy``
        ``H = -sum_j p_j log p_j`` (0.0 at ignored positions).
    """
    if tokens is None:
        raise TypeError("tokens is None; expected an array")
    batch, st, name, _ = forward(logits, tokens, temperature=temperature, ignore_index=ignore_index,
                                 entropy=return_entropy, backend=backend)
    logp = _ops.rows_result(batch, _finish.token_logprob(st, batch.valid), name)
    if not return_entropy:
        return logp
    ent = np.where(batch.valid, _finish.entropy(st), 0.0)
    return logp, _ops.rows_result(batch, ent, name)


def entropy(logits: Any, *, temperature: float = 1.0, backend: str = "auto"):
    """Entropy ``H = -sum_j p_j log p_j`` of ``softmax(logits / temperature)`` per row.

    Computed as ``log s - sum_j e_j (z_j - m) / s`` with ``e_j = exp(z_j - m)``: no cancellation at
    large logit offsets. ``-inf`` entries (masked vocabulary) contribute nothing.

    Parameters
    ----------
    logits : array_like, shape (..., V)
    temperature : float > 0
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    ndarray, shape logits.shape[:-1]
    """
    batch, st, name, _ = forward(logits, None, temperature=temperature, entropy=True, backend=backend)
    return _ops.rows_result(batch, _finish.entropy(st), name)


def kl_divergence(logits: Any, ref_logits: Any, *, temperature: float = 1.0, backend: str = "auto"):
    """Exact ``KL(softmax(z/T) || softmax(w/T))`` per row, from raw logits in one pass over both.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        The policy's logits ``z``.
    ref_logits : array_like, same shape
        The reference policy's logits ``w`` (its dtype may differ).
    temperature : float > 0
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    ndarray, shape logits.shape[:-1]
        ``u/s - log s + log s_w`` with ``u = sum_j e_j ((z_j - m) - (w_j - m_w))``: ``+inf`` where
        the reference gives probability 0 to a token the policy does not.
    """
    if ref_logits is None:
        raise TypeError("ref_logits is None; expected an array")
    batch, st, name, _ = forward(logits, None, ref_logits=ref_logits, temperature=temperature,
                                 full_kl=True, backend=backend)
    return _ops.rows_result(batch, _finish.kl(st), name)


def estimate(r: np.ndarray, estimator: str) -> np.ndarray:
    """Per-token KL estimate from ``r = logp - ref_logp`` (k1, abs, k2, k3)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if estimator == "k1":
            return r
        if estimator == "abs":
            return np.abs(r)
        if estimator == "k2":
            return 0.5 * r * r
        return np.expm1(-r) + r  # k3, exact for small |r|


def kl_penalty(logits: Any, ref_logits: Any, tokens: Any, *, estimator: str = "k1", temperature: float = 1.0,
               ignore_index: int = config.DEFAULT_IGNORE_INDEX, backend: str = "auto"):
    """Per-token KL penalty to a reference policy, from one pass over both logit sets.

    Parameters
    ----------
    logits, ref_logits : array_like, shape (..., V)
        Policy and reference logits (same shape; dtypes may differ).
    tokens : array_like of int, shape logits.shape[:-1]
        Sampled tokens (``ignore_index`` marks padding).
    estimator : {"k1", "abs", "k2", "k3", "full"}
        With ``r = logp - ref_logp``: ``k1 = r``, ``abs = |r|``, ``k2 = r**2 / 2``,
        ``k3 = exp(-r) - 1 + r`` (low variance, TRL/OpenRLHF/verl), ``full`` = the exact
        :func:`kl_divergence` of the position's distributions.
    temperature : float > 0
    ignore_index : int
    backend : {"auto", "cuda", "cpu", "reference"}

    Returns
    -------
    ndarray shaped like ``tokens`` (0.0 at ignored positions)
    """
    estimator = check_estimator(estimator)
    if ref_logits is None or tokens is None:
        raise TypeError("ref_logits and tokens are required arrays")
    batch, st, name, _ = forward(logits, tokens, ref_logits=ref_logits, temperature=temperature,
                                 ignore_index=ignore_index, full_kl=estimator == "full", backend=backend)
    valid = batch.valid
    if estimator == "full":
        pen = _finish.kl(st)
    else:
        with np.errstate(invalid="ignore"):
            r = _finish.token_logprob(st, valid) - _finish.ref_token_logprob(st, valid)
        pen = estimate(r, estimator)
    return _ops.rows_result(batch, np.where(valid, pen, 0.0), name)
