"""Finishers: row statistics (:class:`~ptx_numba._rowpass.RowStats`) -> per-row results and
gradient coefficients, in float64 NumPy, the same code for every backend.

With ``z'`` the transformed logits of a row, ``m`` its shift and ``s = sum exp(z' - m)``:

==================  ===========================================================================
result              formula (cancellation-free)
==================  ===========================================================================
log-sum-exp         ``m + log s``
cross entropy       ``log s - (z'_y - m)``
label smoothing e   ``(1 - e) * ce + e * (log s - d/V)``   (``d/V = mean z' - m``)
z-loss l            ``+ l * lse**2``
token log-prob      ``(z'_y - m) - log s``
entropy             ``log s - t/s``
KL(p || q)          ``u/s - log s + log s_w``
==================  ===========================================================================

Gradient coefficients (``g`` = upstream gradient per row) follow from ``dlse/dz'_j = p_j``:
cross entropy ``A = g (1 + 2 l lse), C = -g (1 - e), D = -g e / V``; log-prob ``A = -g, C = g``;
entropy ``A = g (log s - H), B = -g``; KL ``A = g (log s_w - log s - KL), B = g, E = -g``.
"""
from __future__ import annotations

import numpy as np

from ._rowpass import GradCoef, RowStats


def _quiet():
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def log_s(st: RowStats) -> np.ndarray:
    with _quiet():
        return np.log(st.s)


def lse(st: RowStats) -> np.ndarray:
    """Per-row log-sum-exp of the transformed logits."""
    with _quiet():
        return st.m + np.log(st.s)


def cross_entropy(st: RowStats, valid: np.ndarray, vocab: int, label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> np.ndarray:
    """Per-row loss (0 where ``valid`` is False)."""
    with _quiet():
        ls = np.log(st.s)
        loss = ls - (st.target - st.m)
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (ls - st.d / vocab)
        if z_loss:
            loss = loss + z_loss * (st.m + ls) ** 2
    return np.where(valid, loss, 0.0)


def token_logprob(st: RowStats, valid: np.ndarray) -> np.ndarray:
    """``log p(y)`` per row (0 where ``valid`` is False)."""
    with _quiet():
        return np.where(valid, (st.target - st.m) - np.log(st.s), 0.0)


def ref_token_logprob(st: RowStats, valid: np.ndarray) -> np.ndarray:
    """``log q(y)`` of the second logit set per row (0 where ``valid`` is False)."""
    with _quiet():
        return np.where(valid, (st.target_w - st.m_w) - np.log(st.s_w), 0.0)


def entropy(st: RowStats) -> np.ndarray:
    """``H = -sum p log p`` per row."""
    with _quiet():
        return np.log(st.s) - st.t / st.s


def kl(st: RowStats) -> np.ndarray:
    """``KL(softmax z' || softmax w')`` per row."""
    with _quiet():
        return st.u / st.s - np.log(st.s) + np.log(st.s_w)


# ------------------------------------------------------------------------------------------------
# gradient coefficients
# ------------------------------------------------------------------------------------------------
def _add(a, b):
    return b if a is None else a + b


def ce_coef(st: RowStats, g: np.ndarray, vocab: int, label_smoothing: float = 0.0,
            z_loss: float = 0.0) -> GradCoef:
    """Coefficients of ``g * d(ce)/dz'`` (``g`` is 0 on ignored rows)."""
    with _quiet():
        a = g * (1.0 + 2.0 * z_loss * lse(st)) if z_loss else g.copy()
    a = np.where(g == 0.0, 0.0, a)
    d = -g * (label_smoothing / vocab) if label_smoothing else None
    return GradCoef(A=a, C=-g * (1.0 - label_smoothing), D=d)


def logprob_coef(st: RowStats, g_logp: np.ndarray | None = None, g_entropy: np.ndarray | None = None,
                 g_kl: np.ndarray | None = None) -> GradCoef:
    """Coefficients of ``g_logp * dlogp/dz' + g_entropy * dH/dz' + g_kl * dKL/dz'``."""
    A = B = C = E = None
    ls = log_s(st)
    with _quiet():
        if g_logp is not None:
            A, C = _add(A, -g_logp), g_logp
        if g_entropy is not None:
            h = entropy(st)
            A = _add(A, np.where(g_entropy == 0.0, 0.0, g_entropy * (ls - h)))
            B = _add(B, -g_entropy)
        if g_kl is not None:
            k = kl(st)
            A = _add(A, np.where(g_kl == 0.0, 0.0, g_kl * (np.log(st.s_w) - ls - k)))
            B = _add(B, g_kl)
            E = -g_kl
    return GradCoef(A=A, B=B, C=C, E=E)
