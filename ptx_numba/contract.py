"""The numerics contract, stated once in code (tests, the bench and the docs import it).

* float32, bfloat16 and float16 logits: every per-row result within :data:`TOL_FLOAT32` of the
  float64 value, relative to ``max(1, |exact|)``, on any input; float64 logits within
  :data:`TOL_FLOAT64`. With two logit sets (KL, ``kl_penalty``), the float64 bound needs both sets
  in float64; otherwise the float32 bound applies.
* Cancellation-free forms: ``ce = log s - (z_y - m)`` with ``s = sum_j exp(z_j - m)``, never
  ``lse - z_y``; entropy ``log s - t/s``; KL ``u/s - log s + log s_w`` (the row-pass moments of
  :mod:`ptx_numba._rowpass`). Every reduction ends in float64.
* Special values follow :func:`scipy.special.logsumexp`: a row of all ``-inf`` has ``lse = -inf``;
  any ``+inf`` gives ``+inf``; NaN propagates.
* The mean over no valid row is 0, not NaN (:func:`mean_of`): a batch without pre-training tokens
  adds nothing to the loss.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

#: Relative tolerance (to ``max(1, |exact|)``) for float32 and 16-bit logits.
TOL_FLOAT32 = 2e-5
#: Relative tolerance for float64 logits.
TOL_FLOAT64 = 1e-10


def tolerance(source_dtype: str) -> float:
    """The contract's tolerance for logits of this dtype name ("float64" or a narrower float)."""
    return TOL_FLOAT64 if str(source_dtype) == "float64" else TOL_FLOAT32


def rel_error(got, exact) -> float:
    """Largest ``|got - exact| / max(1, |exact|)`` (0 for empty input; equal infinities and NaNs
    count as exact)."""
    got = np.asarray(got, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    same = (got == exact) | (np.isnan(got) & np.isnan(exact))
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(got - exact) / np.maximum(1.0, np.abs(exact)))
    return float(np.max(np.where(np.isnan(err), np.inf, err), initial=0.0))


def mean_of(total: float, count: int) -> float:
    """``total / count``, or 0.0 when there is no valid row."""
    return float(total) / int(count) if count else 0.0


def combine(partials: Iterable[tuple[float, int]]) -> tuple[float, int]:
    """Add ``(sum, count)`` partials (of row blocks, shards or workers) in float64."""
    total, count = 0.0, 0
    for part_sum, part_count in partials:
        total += float(part_sum)
        count += int(part_count)
    return total, count
