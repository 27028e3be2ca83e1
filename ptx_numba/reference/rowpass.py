"""The row pass in float64 NumPy: the statistics of :class:`ptx_numba._rowpass.RowStats`.

For one logit set ``z'`` (decoded exactly to float64, then transformed), per row:

* ``m = max_j z'_j`` and ``s = sum_j exp(z'_j - m)``, with the canonical special values of
  :mod:`ptx_numba._rowpass` (NaN row: ``m = s = NaN``; ``+inf`` row: ``m = inf, s = 1``; all
  ``-inf``: ``m = -inf, s = 0``);
* ``t = sum_j p~_j (z'_j - m)`` with ``p~_j = exp(z'_j - m)``, terms with ``p~_j = 0`` left out
  (a masked ``-inf`` entry has no entropy, not ``0 * -inf``);
* ``d = sum_j (z'_j - m)`` (``-inf`` when an entry is ``-inf``);
* with a second set ``w'``: its own ``m_w, s_w`` and ``u = sum_j p~_j ((z'_j - m) - (w'_j - m_w))``.

The work goes in row blocks of at most ``config.REFERENCE_BLOCK_ELEMENTS`` elements, so the
float64 copies stay bounded whatever the batch size.
"""
from __future__ import annotations

import numpy as np

from .. import config
from .._rowpass import RowStats, StatsSpec, concat_stats
from .._validate import decode_to_float64


def transform(x: np.ndarray, spec: StatsSpec) -> np.ndarray:
    """Encoded logits -> ``z'`` in float64 (temperature, then softcap)."""
    z = decode_to_float64(x)
    if spec.inv_temperature != 1.0:
        z = z * spec.inv_temperature
    if spec.softcap > 0.0:
        z = spec.softcap * np.tanh(z / spec.softcap)
    return z


def set_shift_and_sum(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, s, special)`` of float64 rows, with the canonical special values."""
    n = z.shape[0]
    if z.shape[1] == 0 or n == 0:
        return np.full(n, -np.inf), np.zeros(n), np.ones(n, dtype=bool)
    has_nan = np.isnan(z).any(axis=1)
    with np.errstate(invalid="ignore"):
        top = np.where(has_nan, np.nan, np.nanmax(np.where(np.isnan(z), -np.inf, z), axis=1))
    special = has_nan | ~np.isfinite(top)
    shift = np.where(special, 0.0, top)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.exp(z - shift[:, None]).sum(axis=1)
    m = np.where(special, top, shift)
    s = np.where(has_nan, np.nan, np.where(top == np.inf, 1.0, np.where(top == -np.inf, 0.0, s)))
    return m, s, special


def _gather(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = np.arange(z.shape[0])
    picked = z[rows, np.where(y >= 0, y, 0)]
    return np.where(y >= 0, picked, np.nan)


def _block_stats(x, y, spec: StatsSpec, w) -> RowStats:
    z = transform(x, spec)
    m, s, special = set_shift_and_sum(z)
    finite_m = np.where(special, 0.0, m)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        rel = z - finite_m
        e = np.exp(rel)
    live = e > 0.0
    target = _gather(z, y) if spec.target else None
    t = d = m_w = s_w = target_w = u = None
    if spec.entropy:
        with np.errstate(invalid="ignore"):
            t = np.where(special, np.nan, np.where(live, e * rel, 0.0).sum(axis=1))
    if spec.dsum:
        with np.errstate(invalid="ignore"):  # +inf and -inf in one row: special anyway
            d = np.where(special, np.nan, rel.sum(axis=1))
    if spec.pair:
        v = transform(w, spec)
        m_w, s_w, special_w = set_shift_and_sum(v)
        rel_w = v - np.where(special_w, 0.0, m_w)[:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            terms = np.where(live, e * (rel - rel_w), 0.0).sum(axis=1)
        u = np.where(special | special_w, np.nan, terms)
        target_w = _gather(v, y) if spec.target else None
    return RowStats(m, s, target, t, d, m_w, s_w, target_w, u)


def row_blocks(n_rows: int, vocab: int) -> range:
    """Start rows of the sub-blocks the reference works in."""
    step = max(1, config.REFERENCE_BLOCK_ELEMENTS // max(vocab, 1))
    return range(0, n_rows, step)


def row_stats(x: np.ndarray, y: np.ndarray, spec: StatsSpec, w: np.ndarray | None = None) -> RowStats:
    """Float64 row statistics of one block (see the module docstring)."""
    n, vocab = x.shape
    parts = []
    starts = row_blocks(n, vocab)
    for start in starts:
        stop = min(start + starts.step, n)
        parts.append(_block_stats(x[start:stop], y[start:stop], spec, None if w is None else w[start:stop]))
    return concat_stats(parts, spec)
