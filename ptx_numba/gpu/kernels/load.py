"""Element loaders and stores per encoding and rank, and the logit transform.

A loader ``load(x, r0, r1, j)`` returns element ``j`` of row ``x[r0, r1]`` of a 3-D ``[B, T, V]``
array in the accumulation type (float32 for f32/f16/bf16, float64 for f64). The kernels read 3-D
arrays only (a 2-D ``[N, V]`` block is viewed as ``[N, 1, V]``) of any layout, so that one compiled
kernel serves every input of an encoding. Device functions cannot return views, so the loader
indexes the array itself; Numba computes the offsets in int64, so any strides work.

Every factory is cached: kernels that need the same piece share one device function, which Numba
types and lowers once per process (typing is most of a kernel's compile time).

The transform works in a *domain* chosen so that ``z' - m`` is computed without cancellation:

* ``plain`` and ``temp``: the domain is the raw logit; the running shift ``m`` is a raw logit and
  ``z' - m' = (z - m) * inv_temperature`` (``z - m`` is exact in float32 for nearby values, where
  rounding ``z * inv_temperature`` first would cost ``|z| * 2**-24`` at a 3e4 offset);
* ``softcap``: the domain is ``z' = c * tanh(z * k)`` itself (``k = inv_temperature / c``), which
  is bounded by ``c``, so its rounding is ``c * 2**-24`` at most.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np

from . import cuda, on_simulator

try:  # libdevice exists only on the real target
    from numba.cuda import libdevice
except ImportError:  # pragma: no cover - simulator
    libdevice = None


@lru_cache(maxsize=None)
def _bf16_to_f32():
    if on_simulator():
        # The simulator runs Python: widen the bits and reinterpret them with NumPy.
        def bf16_sim(bits):
            return (np.uint32(bits) << np.uint32(16)).view(np.float32)

        return cuda.jit(device=True)(bf16_sim)

    def bf16(bits):
        # bfloat16 is the top half of a float32: widen the bits and reinterpret them.
        return libdevice.int_as_float(numba.int32(numba.uint32(bits) << numba.uint32(16)))

    return cuda.jit(device=True)(bf16)


@lru_cache(maxsize=None)
def make_convert(encoding: str, acc):
    """``convert(raw) -> acc``: one stored element to the accumulation type."""
    if encoding == "bf16":
        widen16 = _bf16_to_f32()

        def from_bf16(v):
            return acc(widen16(v))

        return cuda.jit(device=True)(from_bf16)

    def widen(v):
        return acc(v)  # float16 -> float32; a no-op for float32 and float64

    return cuda.jit(device=True)(widen)


@lru_cache(maxsize=None)
def make_loader(encoding: str, acc):
    """``load(x, r0, r1, j) -> acc``: element ``j`` of row ``x[r0, r1]`` of a 3-D array."""
    convert = make_convert(encoding, acc)

    def load3(x, r0, r1, j):
        return convert(x[r0, r1, j])

    return cuda.jit(device=True)(load3)


@lru_cache(maxsize=None)
def make_domain(kind: str, acc):
    """``dom(v, cap, k)``: a loaded logit in the accumulation domain (module docstring)."""
    if kind == "softcap":

        def dom_softcap(v, cap, k):
            return acc(cap * acc(math.tanh(v * k)))

        return cuda.jit(device=True)(dom_softcap)

    def dom_raw(v, cap, k):
        return v

    return cuda.jit(device=True)(dom_raw)


@lru_cache(maxsize=None)
def make_scale(kind: str):
    """``sc(r, inv_t)``: a domain difference ``z - m`` in transformed units ``z' - m'``."""
    if kind == "temp":

        def scale_temp(r, inv_t):
            return r * inv_t

        return cuda.jit(device=True)(scale_temp)

    def scale_one(r, inv_t):
        return r

    return cuda.jit(device=True)(scale_one)


@lru_cache(maxsize=None)
def make_shift_to_zprime(kind: str):
    """float64 ``m'`` from a float64 domain shift (the finish)."""
    if kind == "temp":

        def shift_temp(m, inv_t):
            return m * inv_t

        return cuda.jit(device=True)(shift_temp)

    def shift_same(m, inv_t):
        return m

    return cuda.jit(device=True)(shift_same)


@lru_cache(maxsize=None)
def make_transform64(kind: str):
    """float64 ``z'`` of a float64 logit (the finish's label gather)."""
    if kind == "softcap":

        def tf_softcap(v, inv_t, cap):
            return cap * math.tanh((v * inv_t) / cap)

        return cuda.jit(device=True)(tf_softcap)
    if kind == "temp":

        def tf_temp(v, inv_t, cap):
            return v * inv_t

        return cuda.jit(device=True)(tf_temp)

    def tf_plain(v, inv_t, cap):
        return v

    return cuda.jit(device=True)(tf_plain)


@lru_cache(maxsize=None)
def _bf16_store_bits():
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN."""
    if on_simulator():

        def bits_sim(g):
            b = int(np.float32(g).view(np.uint32))
            if g != g:
                return np.uint16((b >> 16) | 0x0040)
            return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)

        return cuda.jit(device=True)(bits_sim)

    def bits_gpu(g):
        b = numba.uint32(libdevice.float_as_int(g))
        if g != g:
            return numba.uint16((b >> numba.uint32(16)) | numba.uint32(0x0040))
        rounded = b + numba.uint32(0x7FFF) + ((b >> numba.uint32(16)) & numba.uint32(1))
        return numba.uint16(rounded >> numba.uint32(16))

    return cuda.jit(device=True)(bits_gpu)


@lru_cache(maxsize=None)
def make_store(encoding: str):
    """``store(out, r0, r1, j, g)``: write a gradient value into ``out[r0, r1, j]`` in ``encoding``.

    16-bit outputs are rounded once from the float32 value (round to nearest even).
    """
    if encoding == "bf16":
        to_bits = _bf16_store_bits()

        def enc_bf16(g):
            return to_bits(numba.float32(g))

        enc = cuda.jit(device=True)(enc_bf16)
    else:
        out_t = {"f32": numba.float32, "f64": numba.float64, "f16": numba.types.float16}[encoding]

        def enc_float(g):
            return out_t(g)

        enc = cuda.jit(device=True)(enc_float)

    def store3(out, r0, r1, j, g):
        out[r0, r1, j] = enc(g)

    return cuda.jit(device=True)(store3)
