"""The row pass: the one contract between the public functions and every backend.

Every op of the package (log-sum-exp, cross entropy with its options, token log-probs, entropy, KL,
their gradients) is a *thin finisher* over one streaming pass per row of logits. A backend provides
exactly two kernels, both over a block of rows:

``row_stats(x, y, spec, w=None) -> RowStats``
    One fused, streaming read of each row. For every row ``i`` it returns a shift ``m_i`` and
    ``s_i = sum_j exp(z'_ij - m_i)`` (so ``lse_i = m_i + log s_i``), plus the extra moments that
    ``spec`` asks for. ``z' = transform(z)`` (see :class:`StatsSpec`).

``row_grad(x, y, spec, stats, coef, out, w=None) -> None``
    One read (two with ``w``) and one write per element:

    .. code-block:: text

        p_j  = exp(z'_j - m) / s
        g_j  = D + C*[j == y] + (p_j * (A + B*(z'_j - m) + E*(w'_j - m_w))  if p_j > 0 else 0)
        out_j = g_j * dz'_j/dz_j        (= inv_temperature * (1 - (z'_j/c)**2) with a softcap c)

    with per-row coefficients ``A..E`` (:class:`GradCoef`) formed by the finisher. Rows whose
    coefficients are all zero (ignored rows) get an all-zero gradient row. ``g`` is formed in the
    compute precision (float32; float64 for float64 logits) and rounded to ``out``'s dtype last, so a
    16-bit gradient keeps ``p_y - 1`` even when ``p_y`` is within an ulp of 1.

The finishers (:mod:`ptx_numba._finish`) turn :class:`RowStats` into results and :class:`GradCoef`
in float64 NumPy, the same code for every backend.

Block inputs (made by :mod:`ptx_numba._validate`, the single front door)
------------------------------------------------------------------------
* ``x``: 2-D ``[n, V]`` array of one *encoding*: float32, float64, uint16 (bfloat16 bits), int16
  (IEEE float16 bits). The stride along V is the item size; the row stride is arbitrary (so
  ``logits[:, :-1]`` slices and leading-dim strides are read in place). Read-only. On the GPU
  backend ``x`` may also be a device array, 2-D or 3-D ``[B, T, V]`` with any strides.
* ``w``: the second logit set of the pair moments (same shape; its own encoding), or None.
* ``y``: int64 ``[n]``, C-contiguous: a label/token index in ``[0, V)``, or ``-1`` for "no label"
  (ignored rows; every row when the op has no labels). Backends never see ``ignore_index``.
* ``out``: 2-D ``[n, V]`` writable array with unit stride along V, in the encoding of the gradient
  dtype (uint16 = bfloat16 bits, int16 = float16 bits, float32, float64); may alias ``x`` (an
  in-place backward: each element is read before it is written).

Special values (canonical stats)
--------------------------------
Per logit set and row, after the transform: a row holding a NaN has ``m = s = NaN``; else a row
holding ``+inf`` has ``m = +inf, s = 1``; else a row of only ``-inf`` has ``m = -inf, s = 0``. In
those rows ``t``, ``d`` and ``u`` are NaN; ``target`` is always ``z'_y`` itself (NaN where
``y == -1``). The finishers then give :func:`scipy.special.logsumexp`'s special values. ``u`` is
NaN when either set's row is special.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class StatsSpec:
    """What a row pass computes.

    ``transform``: ``z' = z * inv_temperature``, then ``z' = softcap * tanh(z' / softcap)`` when
    ``softcap > 0``. Both logit sets get the same transform.
    """

    inv_temperature: float = 1.0
    softcap: float = 0.0  #: 0.0: no softcap
    target: bool = False  #: gather ``z'_y`` (and ``w'_y`` with a pair)
    entropy: bool = False  #: ``t = sum_j exp(z'_j - m) * (z'_j - m)``
    dsum: bool = False  #: ``d = sum_j (z'_j - m)`` (label smoothing: ``mean_j z'_j = m + d/V``)
    pair: bool = False  #: a second set ``w``: ``m_w``, ``s_w``, ``u``

    @property
    def plain(self) -> bool:
        """Only ``m, s`` (and the target): the fast loops' case."""
        return (self.inv_temperature == 1.0 and self.softcap == 0.0 and not self.entropy
                and not self.dsum and not self.pair)


class RowStats(NamedTuple):
    """Per-row statistics of a block, float64 ``[n]`` arrays (None where not asked for)."""

    m: np.ndarray  #: shift
    s: np.ndarray  #: ``sum_j exp(z'_j - m)``
    target: np.ndarray | None = None  #: ``z'_y`` (NaN where ``y == -1``)
    t: np.ndarray | None = None  #: ``sum_j exp(z'_j - m) * (z'_j - m)``
    d: np.ndarray | None = None  #: ``sum_j (z'_j - m)``
    m_w: np.ndarray | None = None  #: shift of the second set
    s_w: np.ndarray | None = None  #: ``sum_j exp(w'_j - m_w)``
    target_w: np.ndarray | None = None  #: ``w'_y``
    u: np.ndarray | None = None  #: ``sum_j exp(z'_j - m) * ((z'_j - m) - (w'_j - m_w))``


class GradCoef(NamedTuple):
    """Per-row coefficients of the gradient pass (float64 ``[n]`` arrays; None means 0)."""

    A: np.ndarray | None = None
    B: np.ndarray | None = None
    C: np.ndarray | None = None
    D: np.ndarray | None = None
    E: np.ndarray | None = None


@runtime_checkable
class Backend(Protocol):
    """What every backend object provides (``ptx_numba.<backend>.BACKEND``)."""

    name: str

    def is_available(self) -> tuple[bool, str]:
        """``(True, "")`` if it can run here, else ``(False, why)``; never raises."""

    def row_stats(self, x, y: np.ndarray, spec: StatsSpec, w=None) -> RowStats:
        """The row pass over one block (see the module docstring)."""

    def row_grad(self, x, y: np.ndarray, spec: StatsSpec, stats: RowStats, coef: GradCoef, out,
                 w=None) -> None:
        """The gradient pass over one block, written into ``out``."""


def empty_stats(spec: StatsSpec) -> RowStats:
    """The stats of a block with no rows."""
    e = np.zeros(0)
    return RowStats(e, e, e if spec.target else None, e if spec.entropy else None,
                    e if spec.dsum else None, e if spec.pair else None, e if spec.pair else None,
                    e if spec.pair and spec.target else None, e if spec.pair else None)


def concat_stats(parts: list[RowStats], spec: StatsSpec) -> RowStats:
    """Stats of consecutive blocks joined into one (None fields stay None)."""
    if not parts:
        return empty_stats(spec)
    if len(parts) == 1:
        return parts[0]
    fields = []
    for values in zip(*parts):
        fields.append(None if values[0] is None else np.concatenate(values))
    return RowStats(*fields)
