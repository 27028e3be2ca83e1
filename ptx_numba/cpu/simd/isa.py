"""Which exp-sum loop a row walk runs: one tiny Numba type per instruction set.

The walk of :mod:`ptx_numba.cpu.rowpass` is written once and takes an *ISA marker* as its first
argument: :data:`PORTABLE` (Numba loops that LLVM vectorizes, every CPU), :data:`AVX2` (the 8-lane
loops of :mod:`.expsum`) or :data:`AVX512` (its 16-lane loops). Each marker has its own Numba type,
so the walk compiles (and is cached) once per marker, and the ``@overload``\\ ed functions below
(:func:`setup`, :func:`expsum`, :func:`shift_limit`) pick the loop from that type at compile time.
:func:`for_dtype` picks the marker from :func:`.features.choose`.

Why a type and not a function argument: a jitted function passed as an argument is typed by the
dispatcher object's identity, and Numba's disk cache then missed in every new process (measured).
A marker type has a stable name, so kernels specialised on it load from the cache.

Adding an instruction set is one marker class, its type, and one branch in each overload.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from . import expsum as _loops
from . import features
from .shift import constants as _constants
from .shift import shift_limit as _shift_limit
from .primitives import decode, fast_exp, zero_like


class IsaType(types.Dummy):
    """Numba type of an ISA marker (a value that carries no data, only its type)."""


class PortableType(IsaType):
    def __init__(self):
        super().__init__(name="ptx_numba.isa.portable")


class Avx2Type(IsaType):
    def __init__(self):
        super().__init__(name="ptx_numba.isa.avx2")


class Avx512Type(IsaType):
    def __init__(self):
        super().__init__(name="ptx_numba.isa.avx512")


portable_type = PortableType()
avx2_type = Avx2Type()
avx512_type = Avx512Type()


class Isa:
    """A marker object passed to the kernels; ``name`` is for messages only."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<ISA {self.name}>"


class _Portable(Isa):
    pass


class _Avx2(Isa):
    pass


class _Avx512(Isa):
    pass


#: The portable loops (every CPU).
PORTABLE = _Portable("portable")
#: The 8-lane loops (x86-64 with AVX2 + FMA; see :mod:`.avx2`).
AVX2 = _Avx2("avx2")
#: The 16-lane loops (AVX-512 F/BW/DQ/VL; see :mod:`.expsum`).
AVX512 = _Avx512("avx512")
#: Marker per ISA name of :mod:`.features`.
BY_NAME = {"portable": PORTABLE, "avx2": AVX2, "avx512": AVX512}

for _cls, _type in ((_Portable, portable_type), (_Avx2, avx2_type), (_Avx512, avx512_type)):
    typeof_impl.register(_cls)(lambda value, context, _type=_type: _type)
    register_model(type(_type))(models.OpaqueModel)


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


@intrinsic
def portable(typingctx):
    """The :data:`PORTABLE` marker inside Numba code (the fallback of the other loops)."""

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return portable_type(), codegen


# --------------------------------------------------------------------------------------------
# the portable loop (LLVM vectorizes it: reassoc lets the float32 sum go into SIMD lanes)
# --------------------------------------------------------------------------------------------
_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}  # == config.CPU_FASTMATH (no nnan/ninf)


@njit(fastmath=_FLAGS, cache=True, nogil=True)
def portable_expsum(chunk, shift):
    """``sum_j exp(decode(chunk[j]) - shift)`` in the compute type's SIMD lanes."""
    total = zero_like(chunk[0])
    for j in range(chunk.size):  # a 0-based loop over a slice: no wraparound index checks
        total += fast_exp(decode(chunk[j]) - shift)
    return total


# --------------------------------------------------------------------------------------------
# the dispatching functions
# --------------------------------------------------------------------------------------------
def setup(isa, shift):
    """``(m, consts, corr)`` for a walk at ``shift`` (finite, compute type; Numba-only).

    ``m`` (float64) is the shift really used, ``consts`` what :func:`expsum` needs, and
    ``corr * expsum(isa, chunk, consts)`` is ``sum_j exp(z_j - m)``.
    """
    raise NotImplementedError("setup is a Numba-only function")


def expsum(isa, chunk, consts):
    """The chunk's exp-sum against the shift :func:`setup` made ``consts`` for (Numba-only)."""
    raise NotImplementedError("expsum is a Numba-only function")


def shift_limit(isa, shift):
    """Largest ``|shift|`` the loop accepts for a shift of this type (Numba-only)."""
    raise NotImplementedError("shift_limit is a Numba-only function")


@overload(setup, jit_options={"cache": True})
def _setup_overload(isa, shift):
    if isinstance(isa, PortableType):
        return lambda isa, shift: (np.float64(shift), (shift,), 1.0)
    if isinstance(isa, (Avx2Type, Avx512Type)):  # one set of constants for every width
        def impl(isa, shift):
            m, k, ms, lo, hi, corr = _constants(shift)
            return m, (k, ms, lo, hi), corr
        return impl
    return None


@overload(expsum, jit_options={"cache": True})
def _expsum_overload(isa, chunk, consts):
    if isinstance(isa, PortableType):
        return lambda isa, chunk, consts: portable_expsum(chunk, consts[0])
    if isinstance(isa, Avx2Type):
        return lambda isa, chunk, consts: _loops.expsum_avx2(chunk, consts[0], consts[1], consts[2], consts[3])
    if isinstance(isa, Avx512Type):
        return lambda isa, chunk, consts: _loops.expsum_avx512(chunk, consts[0], consts[1], consts[2], consts[3])
    return None


@overload(shift_limit, jit_options={"cache": True})
def _shift_limit_overload(isa, shift):
    if isinstance(isa, PortableType):
        return lambda isa, shift: math.inf
    if isinstance(isa, (Avx2Type, Avx512Type)):
        return lambda isa, shift: _shift_limit(shift)
    return None


def for_dtype(dtype: np.dtype, allow_simd: object = None) -> Isa:
    """The marker the plain walk uses for logits of this encoded dtype.

    Parameters
    ----------
    dtype : numpy.dtype
        The encoded logits dtype (float32, float64, uint16, int16).
    allow_simd : object, optional
        ``config.CPU_AVX2``: False forces :data:`PORTABLE`; anything else defers to
        :func:`.features.choose` (``config.CPU_ISA``, ``$PTX_NUMBA_CPU_ISA``, else the best ISA
        of the compile target). An ISA that cannot read ``dtype`` (AVX2 float16 without F16C)
        falls back to :data:`PORTABLE`.

    Raises
    ------
    ValueError
        The requested ISA is unknown or the compile target lacks it.
    """
    if allow_simd is False:
        return PORTABLE
    name = features.choose()
    if not features.supports(name, np.dtype(dtype)):
        return PORTABLE
    return BY_NAME[name]


__all__ = ["AVX2", "AVX512", "BY_NAME", "PORTABLE", "Isa", "IsaType", "expsum", "for_dtype", "portable",
           "setup", "shift_limit"]
