"""Which hand-written loop the CPU kernels run: the host's best of AVX-512, AVX2 and portable.

The choice follows the CPU features Numba compiles for (:func:`target_cpu_features`), not the
CPU the process happens to run on, so a cache built with ``NUMBA_CPU_NAME=generic`` or an explicit
``NUMBA_CPU_FEATURES`` list never holds an instruction the target lacks:

``"avx512"``
    AVX-512 F, BW, DQ and VL (every AVX-512 CPU since Skylake-SP, AMD Zen 4): the 16-lane loops of
    :mod:`.expsum`. BW is needed for the masked 16-bit tail loads, and AVX-512 F includes the
    ``vcvtph2ps`` zmm form, so float16 needs nothing more.
``"avx2"``
    AVX2 and FMA: the 8-lane loops (float16 also needs F16C).
``"portable"``
    Anything else (or nothing known): the loop LLVM vectorizes by itself.

``config.CPU_ISA`` (``None`` = automatic, or one of the names above; while it is None the
environment variable ``PTX_NUMBA_CPU_ISA`` is read, at call time) lowers the choice, e.g. to
compare loops on one machine; asking for an ISA the target lacks is an error, since running its
instructions would kill the process with SIGILL.
"""
from __future__ import annotations

import functools
import os

from ptx_numba import config

from .primitives import is_x86_64, target_cpu_features

#: The ISA names, best first.
ISAS = ("avx512", "avx2", "portable")

#: Features each hand-written loop needs, beyond x86-64.
REQUIRED = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}),
    "avx2": frozenset({"avx2", "fma"}),
    "portable": frozenset(),
}


@functools.lru_cache(maxsize=8)
def _target_features(cpu_name, cpu_features) -> frozenset[str]:
    # keyed on Numba's target settings, so a test or script that changes them is seen
    return target_cpu_features()


def _features() -> frozenset[str]:
    import numba

    return _target_features(numba.config.CPU_NAME, numba.config.CPU_FEATURES)


def available(features: frozenset[str] | None = None, x86_64: bool | None = None) -> tuple[str, ...]:
    """The ISAs whose loops can run for this feature set, best first (always ends in "portable").

    Parameters
    ----------
    features : frozenset of str, optional
        x86 feature names without the ``+`` (default: those Numba compiles for).
    x86_64 : bool, optional
        Whether the target is x86-64 (default: this machine).
    """
    if features is None:
        features = _features()
    if x86_64 is None:
        x86_64 = is_x86_64()
    if not x86_64:
        return ("portable",)
    return tuple(name for name in ISAS if REQUIRED[name] <= features)


def requested() -> str | None:
    """The explicit ISA choice: ``config.CPU_ISA``, else ``$PTX_NUMBA_CPU_ISA``, else None.

    Raises
    ------
    ValueError
        The value is no ISA name (the message names where it came from).
    """
    value, source = config.CPU_ISA, "config.CPU_ISA"
    if value is None:
        value = os.environ.get(config.CPU_ISA_ENV_VAR, "").strip().lower() or None
        source = config.CPU_ISA_ENV_VAR
    if value is not None and value not in ISAS:
        raise ValueError(f"{source} must be one of {ISAS} (or unset for the best available), got {value!r}")
    return value


def choose(override: str | None = None, features: frozenset[str] | None = None,
           x86_64: bool | None = None) -> str:
    """The ISA the CPU kernels use: ``override`` (or :func:`requested`) if set, else the best.

    Parameters
    ----------
    override : {None, "avx512", "avx2", "portable"}, optional
        Explicit choice; ``None`` reads ``config.CPU_ISA`` and then ``$PTX_NUMBA_CPU_ISA``
        (unset there too: the best available).
    features, x86_64
        As for :func:`available`.

    Raises
    ------
    ValueError
        The choice is no ISA name, or names an ISA the compile target lacks.
    """
    if override is None:
        override = requested()
    elif override not in ISAS:
        raise ValueError(f"CPU_ISA must be None or one of {ISAS}, got {override!r}")
    usable = available(features, x86_64)
    if override is None:
        return usable[0]
    if override not in usable:
        missing = sorted(REQUIRED[override] - (features if features is not None else _features()))
        raise ValueError(f"CPU_ISA={override!r} needs CPU features the compile target lacks "
                         f"({', '.join(missing) or 'x86-64'}); available: {usable}")
    return override


def supports(isa: str, dtype) -> bool:
    """Whether the ``isa`` loop reads logits of this encoded numpy dtype (``"portable"``: all four).

    Parameters
    ----------
    isa : {"avx512", "avx2", "portable"}
    dtype : numpy.dtype
        float32, float64, uint16 (bfloat16 bits) or int16 (float16 bits). float16 on the AVX2
        loop also needs F16C; AVX-512 F has the conversion itself.
    """
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64, np.uint16, np.int16):
        return False
    if isa == "avx2" and dtype == np.int16:
        return "f16c" in _features()
    return True
