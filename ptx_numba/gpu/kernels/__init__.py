"""numba.cuda pieces of the row pass: element loaders, reductions, finish, and the two kernels.

Imported only on first use of the ``cuda`` backend (it imports numba.cuda). The pieces:

* :mod:`.load`: per-encoding element loaders (float32, float64, float16, bfloat16 bits; 3-D
  arrays of any layout, 2-D blocks are viewed as ``[N, 1, V]``) and the logit transform.
* :mod:`.reduce`: the online ``(m, s, moments)`` state, its combine, and the block reductions
  (warp shuffles on a GPU, a shared-memory tree on the simulator or when asked).
* :mod:`.finish`: thread 0 writes a row's statistics in float64, with the canonical special values.
* :mod:`.stats`: the row-statistics kernel built from those pieces; :mod:`.grad`: the gradient kernel.
* :mod:`.variants`: every kernel key the public ops launch (what the compile tests compile).
"""
from __future__ import annotations

import numba
from numba import cuda  # under NUMBA_ENABLE_CUDASIM=1 this is the simulator's module

#: Encodings the kernels read: f32, f64, f16 (IEEE half) and bf16 (bfloat16 bits in uint16).
ENCODINGS = ("f32", "f64", "f16", "bf16")

#: The element type each encoding is stored as on the device.
ELEMENT = {"f32": numba.float32, "f64": numba.float64, "f16": numba.types.float16, "bf16": numba.uint16}

#: Logit transforms: ``plain`` (none), ``temp`` (``z * inv_temperature``), ``softcap``
#: (``c * tanh(z * inv_temperature / c)``). The scale factors are kernel arguments, so a new
#: temperature never compiles a new kernel; only the kind is compiled in.
TRANSFORMS = ("plain", "temp", "softcap")

#: Bits of the per-thread flag word carried through the reductions.
NAN_Z = 1  #: a NaN in the first logit set
NINF_Z = 2  #: a -inf in the first set (makes ``d = -inf``)
NAN_W = 4  #: a NaN in the second set
UINF = 8  #: an entry with ``p > 0`` where the second set is -inf (makes ``u = +inf``)

#: Lazy rescaling: the running shift moves only when a new maximum exceeds it by more than this
#: (in transformed units). Terms stay below e**8 ~ 3e3, far from float32 overflow even at
#: V = 2**24, and the shift rarely moves, so the float32 rounding of ``s * exp(m_old - m_new)``
#: cannot pile up on a slowly rising row (each rescale multiplies the old sum by < e**-8).
LAZY_SHIFT = 8.0


def on_simulator() -> bool:
    """True when numba.cuda is Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(getattr(numba.config, "ENABLE_CUDASIM", 0)) or "simulator" in getattr(
        cuda.to_device, "__module__", ""
    )


def compiled(cache: dict, key, signature, build):
    """The kernel of ``key`` from ``cache``; compiled on first request as ``build(key)`` for the
    one signature ``signature(key)`` (so a key is exactly one compiled kernel, whatever the call)."""
    kernel = cache.get(key)
    if kernel is None:
        kernel = cuda.jit(signature(key))(build(key))
        cache[key] = kernel
    return kernel


def acc_type(encoding: str):
    """The accumulation type: float64 for float64 logits, float32 for the 16/32-bit encodings."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    return numba.float64 if encoding == "f64" else numba.float32


def transform_kind(inv_temperature: float, softcap: float) -> str:
    """The compiled transform for a spec's scale factors."""
    if softcap > 0.0:
        return "softcap"
    return "plain" if inv_temperature == 1.0 else "temp"
