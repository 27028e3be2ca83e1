"""The AVX2 + FMA exp-sum loop: 8 float32 lanes (4 float64) per ``ymm`` register.

The loop itself is the 8-lane flavour of the width-generic emitter in :mod:`.expsum` (where the
algorithm, its accuracy and its constants are described): ``expsum(chunk, k, ms, lo, hi)`` is
``sum_j 2**((chunk[j]*K8 - S)/8)`` for float32, bfloat16 (uint16 bits) and float16 (int16 bits)
chunks, ``sum_j 2**(chunk[j]*K1 - S)`` for float64 ones, with the constants of :func:`constants`.
Each term is ``exp(x - m)`` to within 1.5 ulp in float32 lanes and 5e-14 in float64 lanes.

The loop needs x86-64 with AVX2 and FMA, and F16C for float16; :data:`AVAILABLE` and
:func:`supports` say whether the compile target has them (:mod:`.features` decides which loop the
kernels run, AVX-512 included). The shift arithmetic (:func:`constants`, :func:`shift_limit`) is in
:mod:`.shift` and re-exported here, beside the loop.
"""
from __future__ import annotations

import numpy as np

from . import features
from .expsum import expsum_avx2 as expsum  # noqa: F401  (the loop of this ISA)
from .shift import (  # noqa: F401  (re-exported)
    K1_F64,
    K8,
    KAPPA_MINUS_ONE,
    MAGIC,
    MAGIC64,
    S_LIMIT,
    S_LIMIT64,
    constants,
    shift_constants,
    shift_constants_f64,
    shift_limit,
)

#: True where the compile target can run the loop (x86-64 with AVX2 and FMA).
AVAILABLE = "avx2" in features.available()


def supports(dtype: np.dtype) -> bool:
    """Whether :func:`expsum` handles this encoded logits dtype on this compile target.

    Parameters
    ----------
    dtype : numpy.dtype
        float32, float64, uint16 (bfloat16 bits) or int16 (float16 bits, needs F16C).
    """
    return AVAILABLE and features.supports("avx2", dtype)
