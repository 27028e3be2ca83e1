"""The entropy walk: the plain walk of :mod:`.rowpass` on the hand-written loops, plus ``t``.

For a :class:`StatsSpec` that is plain except for ``entropy`` (and ``target``): no temperature,
no softcap, no ``dsum``, no pair. Each chunk is summed by the *moment* twin of the ISA's exp-sum
loop (:data:`.simd.expsum.MOMENT_FOR_ISA`), which returns ``(sum term, sum term * (x*K - S))``
in one read: the same terms as the forward CE (``term = 2**((x*K8 - S)/8)``), so entropy costs
one FMA per vector more than the CE instead of the moments walk's portable loop.

In natural units, with ``m, corr`` from the loop's ``constants`` (``corr * sum term = sum
exp(x - m)``) and ``S/K = m + delta0`` (``delta0 = log(corr)`` up to kappa, ~1e-16 |m|)::

    s_chunk = corr * ps,    t_chunk = corr * (pt / K + delta0 * ps)

When the shift moves from ``m`` to ``m'`` (``delta = m' - m``) the accumulators move as the
protocol defines them: ``t' = e^-delta (t - delta s)``, ``s' = e^-delta s``. Pieces whose shift
lies outside the loop's range are walked by :func:`.moments.moments_walk` instead.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange
from numba.extending import overload

from .._rowpass import StatsSpec
from ._jit import CHUNK, jit, piece_bounds
from ._jit import MOMENT_TRIGGER as TRIGGER
from .moments import moments_walk, tmax
from .simd import isa as _isa
from .simd.expsum import MOMENT_FOR_ISA
from .simd.primitives import decode, zero_like


def moment_expsum(isa, chunk, consts):
    """``(sum term, sum term * (x*K - S))`` of a chunk on ``isa``'s moment loop (Numba-only)."""
    raise NotImplementedError("moment_expsum is a Numba-only function")


def _moment_loop(isa_type):
    """The moment twin for an ISA marker type (``ptx_numba.isa.<name>``), or None."""
    return MOMENT_FOR_ISA.get(str(isa_type.name).rsplit(".", 1)[-1])


@overload(moment_expsum, jit_options={"cache": True})
def _moment_expsum_overload(isa, chunk, consts):
    loop = _moment_loop(isa)
    if loop is None:
        return None
    return lambda isa, chunk, consts: loop(chunk, consts[0], consts[1], consts[2], consts[3])


def handles(spec: StatsSpec, marker: _isa.Isa) -> bool:
    """Whether :func:`entropy_kernel` computes ``spec`` on ``marker``'s loop."""
    return (spec.entropy and not spec.dsum and not spec.pair and spec.inv_temperature == 1.0
            and spec.softcap == 0.0 and MOMENT_FOR_ISA.get(marker.name) is not None)


@jit()
def entropy_walk(isa, piece):
    """``(m, s, t, ok)`` of a piece (see :func:`.rowpass.walk`; ``t = sum e^(x-m) (x-m)``)."""
    n = piece.size
    first = decode(piece[0])
    limit = _isa.shift_limit(isa, first)
    started = abs(first) < limit  # finite and in range (NaN compares false)
    m, consts, corr = _isa.setup(isa, first if started else zero_like(piece[0]))
    delta0 = math.log(corr)
    inv_k = 1.0 / float(consts[0])
    s = t = 0.0
    for start in range(0, n, CHUNK):
        chunk = piece[start:min(start + CHUNK, n)]
        if started:
            ps, pt = moment_expsum(isa, chunk, consts)
            if not ps > TRIGGER:  # a NaN partial goes on to the sums, where the finish spots it
                s += corr * float(ps)
                t += corr * (float(pt) * inv_k + delta0 * float(ps))
                continue
        top = tmax(chunk, None, 0.0)
        if top != top:
            return math.nan, math.nan, math.nan, True
        if top == -np.inf:
            continue
        if top == np.inf:
            return math.inf, math.nan, math.nan, True
        if not abs(top) < limit:
            return 0.0, 0.0, 0.0, False
        if not started or top > m:
            new_m, consts, corr = _isa.setup(isa, top)
            delta0 = math.log(corr)
            if s > 0.0:
                delta = new_m - m
                f = math.exp(-delta)
                t = f * (t - delta * s)
                s = f * s
            m = new_m
            started = True
        ps, pt = moment_expsum(isa, chunk, consts)
        s += corr * float(ps)
        t += corr * (float(pt) * inv_k + delta0 * float(ps))
    if not started:
        return -math.inf, 0.0, 0.0, True
    return m, s, t, True


@jit(parallel=True)
def entropy_kernel(isa, flat, row0, stride, n_rows, vocab, pieces_per_row, acc):
    """Fill ``acc[row, piece, 0:3]`` with the ``(m, s, t)`` of every piece of every row."""
    for task in prange(n_rows * pieces_per_row):
        row, piece, start, stop = piece_bounds(task, pieces_per_row, vocab)
        if start >= stop:
            acc[row, piece, 0], acc[row, piece, 1], acc[row, piece, 2] = -np.inf, 0.0, 0.0
            continue
        base = row0 + row * stride
        part = flat[base + start:base + stop]
        m, s, t, ok = entropy_walk(isa, part)
        if not ok:  # a shift beyond the loop's range: the moments walk (temperature 1, no cap)
            r = moments_walk(part, None, 1.0, None)
            m, s, t = r[0], r[1], r[2]
        acc[row, piece, 0], acc[row, piece, 1], acc[row, piece, 2] = m, s, t
