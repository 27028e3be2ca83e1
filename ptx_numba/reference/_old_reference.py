"""NumPy reference backend: float64 throughout, written to be read. The executable spec.

Every other backend must compute the same functions (to within the numerics contract in
``docs/numerics.md``) on every valid input. Inputs are the normalised host batch described in
:mod:`ptx_numba._validate`.

Special values follow :func:`scipy.special.logsumexp`:

* a row whose entries are all ``-inf`` has ``lse = -inf``;
* any ``+inf`` entry gives ``lse = +inf``; any NaN gives NaN;
* ``ce = lse - z[y]``: ``+inf`` when the label's logit is ``-inf`` but the row has a finite entry.
  It is evaluated as ``log(sum_j exp(z_j - m)) - (z[y] - m)``, which is the same number without
  the cancellation of two large ones (``lse - z[y]`` loses everything below ulp(lse): a CE of 1e-7
  reads as 0 at an offset of 2.5e9).
"""
from __future__ import annotations

import numpy as np

from .._validate import decode_to_float64

NAME = "reference"


def is_available() -> tuple[bool, str]:
    """The reference needs only NumPy, so it is always available."""
    return True, ""


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp.

    Parameters
    ----------
    x : ndarray, shape (N, V)
        Encoded logits (float32, float64, or 16-bit encodings).

    Returns
    -------
    ndarray, shape (N,), float64
        ``log(sum_j exp(x[i, j]))``, computed as ``m + log(sum_j exp(x[i, j] - m))``
        with ``m`` the row max (or 0 where the max is not finite).
    """
    shift, log_total = _shift_and_log_total(decode_to_float64(x))
    return log_total + shift


def _shift_and_log_total(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float64 ``z``: ``m`` and ``log(sum_j exp(z_j - m))``, so ``lse = m + log_total``."""
    if z.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    row_max = z.max(axis=1)
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return shift, np.log(np.exp(z - shift[:, None]).sum(axis=1))


def cross_entropy_rows(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """Per-row cross entropy ``lse(z_i) - z_i[y_i]``; rows with ``y_i == ignore_index`` are 0.

    Parameters
    ----------
    x : ndarray, shape (N, V)
        Encoded logits.
    labels : ndarray, shape (N,), int64
        Class indices in ``[0, V)`` or ``ignore_index``.
    ignore_index : int
        Label value marking a row to skip.

    Returns
    -------
    ndarray, shape (N,), float64
    """
    z = decode_to_float64(x)
    valid = labels != ignore_index
    out = np.zeros(z.shape[0], dtype=np.float64)
    if valid.any():
        rows = np.flatnonzero(valid)
        shift, log_total = _shift_and_log_total(z[rows])
        with np.errstate(invalid="ignore"):
            out[rows] = log_total - (z[rows, labels[rows]] - shift)
    return out


def cross_entropy_sum(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> tuple[float, int]:
    """Sum of per-row cross entropy over non-ignored rows, and the number of such rows."""
    valid = int(np.count_nonzero(labels != ignore_index))
    return float(np.sum(cross_entropy_rows(x, labels, ignore_index))), valid
