"""Input checks and coercion for every public function, in one place.

Every backend receives the same normalised host batch:

* ``logits``: a read-only, C-contiguous 2-D NumPy array ``[N, V]`` holding one of four *encodings*
  (the kernels specialise on the array dtype):

  ==============  =====================================================
  array dtype     meaning
  ==============  =====================================================
  ``float32``     float32 logits
  ``float64``     float64 logits
  ``uint16``      bfloat16 logits, raw bits (value = bits << 16 as f32)
  ``int16``       IEEE float16 logits, raw bits
  ==============  =====================================================

  Half-width inputs stay half-width so the kernels read half the bytes; NumPy has no bfloat16 and
  Numba has no float16 on the CPU, so both travel as 16-bit integers.
* ``labels``: a C-contiguous ``int64`` copy ``[N]`` (never the caller's buffer), already checked to be
  in ``[0, V)`` or equal to ``ignore_index``.

Device arrays (``__cuda_array_interface__``) are not coerced here; :func:`is_device_array` lets the
dispatcher route them to the CUDA backend, which applies the same checks on its side.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Any, NamedTuple

import numpy as np

BF16 = np.dtype(np.uint16)  # encoding of bfloat16 bits
F16 = np.dtype(np.int16)  # encoding of float16 bits
ENCODINGS = (np.dtype(np.float32), np.dtype(np.float64), BF16, F16)


class HostBatch(NamedTuple):
    """A validated batch, ready for a host backend (see module docstring)."""

    logits: np.ndarray  # [N, V] encoded, read-only, C-contiguous
    labels: np.ndarray | None  # [N] int64, or None for logsumexp
    batch_shape: tuple  # logits.shape[:-1] as the caller gave it
    source_dtype: str  # "float32", "float64", "bfloat16" or "float16"

    @property
    def out_dtype(self) -> np.dtype:
        """float64 for float64 logits, float32 for every narrower float."""
        return np.dtype(np.float64 if self.source_dtype == "float64" else np.float32)


# --------------------------------------------------------------------------------------------
# helpers about foreign array types (never import torch: look it up only if the caller did)
# --------------------------------------------------------------------------------------------
def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_device_array(obj: Any) -> bool:
    """True for GPU-resident arrays (numba device arrays, CuPy, torch CUDA tensors)."""
    if isinstance(obj, np.ndarray):
        return False
    if _is_torch_tensor(obj):
        return obj.device.type == "cuda"
    if type(obj).__name__ == "FakeCUDAArray":  # numba's CUDA simulator: no interface attribute
        return True
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:  # some objects raise from the property itself
        return False


def _torch_to_numpy(t: Any) -> tuple[np.ndarray, str | None]:
    """Zero-copy view of a CPU tensor; bf16/fp16 come back as their 16-bit encodings."""
    torch = sys.modules["torch"]
    t = t.detach()
    if t.device.type != "cpu":
        raise TypeError(f"expected a CPU tensor here, got one on {t.device}")
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy(), "float16"
    if t.is_complex():
        raise TypeError(f"logits must be real, got a {t.dtype} tensor")
    return t.numpy(), None


def _as_numpy(obj: Any, what: str) -> tuple[np.ndarray, str | None]:
    """Turn an array-like into a NumPy array without copying where possible.

    Returns ``(array, tag)`` where ``tag`` is ``"bfloat16"``/``"float16"`` when the array already
    holds 16-bit encoded bits, else None.
    """
    if obj is None:
        raise TypeError(f"{what} is None; expected an array")
    if isinstance(obj, (str, bytes)):
        raise TypeError(f"{what} must be numeric, got {type(obj).__name__}")
    if _is_torch_tensor(obj):
        return _torch_to_numpy(obj)
    if isinstance(obj, np.ndarray):
        return obj, None
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):
        return np.asarray(obj), None
    if hasattr(obj, "__dlpack__"):
        try:
            return np.from_dlpack(obj), None
        except Exception as exc:  # e.g. a device-only producer
            raise TypeError(f"could not read {what} through DLPack: {exc}") from None
    try:
        arr = np.asarray(obj)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{what} is ragged (rows of different lengths): {exc}") from None
    if arr.dtype == object:
        raise ValueError(f"{what} is ragged or holds non-numbers; expected a rectangular numeric array")
    return arr, None


# --------------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------------
def _encode_logits(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Map any real NumPy dtype onto one of :data:`ENCODINGS`."""
    dt = arr.dtype
    if dt.name == "bfloat16":  # ml_dtypes / jax arrays
        return arr.view(np.uint16), "bfloat16"
    if dt.kind == "f":
        if dt.itemsize == 2:
            return arr.view(np.int16), "float16"
        if dt.itemsize == 4:
            return arr, "float32"
        if dt.itemsize == 8:
            return arr, "float64"
        return arr.astype(np.float64), "float64"  # long double: computed in float64
    if dt.kind in "iu":
        return arr.astype(np.float64), "float64"
    if dt.kind == "b":
        raise TypeError("logits must be real numbers, got a boolean array")
    raise TypeError(f"logits must be real numbers, got dtype {dt}")


def as_host_logits(logits: Any) -> tuple[np.ndarray, tuple, str]:
    """Validate logits; return ``(encoded [N, V] array, batch_shape, source_dtype)``."""
    arr, tag = _as_numpy(logits, "logits")
    arr = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))  # before any .view
    if tag is None:
        arr, tag = _encode_logits(arr)
    if arr.ndim < 2:
        raise ValueError(
            f"logits must have shape [..., V] with at least 2 dimensions (rows x vocabulary); "
            f"got shape {arr.shape}"
        )
    vocab = arr.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits has an empty vocabulary (V == 0), shape {arr.shape}")
    batch_shape = arr.shape[:-1]
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr.reshape(-1, vocab))
    view = arr.view()
    view.flags.writeable = False  # the kernels only read; this also guards the caller's buffer
    return view, batch_shape, tag


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
def check_ignore_index(ignore_index: Any) -> int:
    """``ignore_index`` must be an integer (any NumPy integer too), not a bool or a float."""
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    return int(ignore_index)


def labels_to_int64(arr: np.ndarray) -> np.ndarray:
    """Integer labels as an int64 copy; integral floats accepted, anything else rejected."""
    dt = arr.dtype
    if dt.kind in "iu":
        if dt == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError("labels hold values too large for int64")
        return np.array(arr, dtype=np.int64, order="C", copy=True)
    if dt.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            pos = np.unravel_index(int(np.argmax(bad)), arr.shape)
            raise ValueError(
                f"labels must be integers; labels[{_fmt_pos(pos)}] = {arr[pos]!r} is not integral"
            )
        return np.array(arr, dtype=np.int64, order="C", copy=True)
    if dt.kind == "b":
        raise TypeError("labels must be integers, got a boolean array")
    raise TypeError(f"labels must be integers, got dtype {dt}")


def _fmt_pos(pos: tuple) -> str:
    return ", ".join(str(int(p)) for p in pos)


def label_error(labels_shape: tuple, flat_row: int, value: int, vocab: int, ignore_index: int) -> ValueError:
    """The one message for an out-of-range label (shared with the CUDA backend)."""
    pos = np.unravel_index(flat_row, labels_shape) if labels_shape else ()
    where = f"labels[{_fmt_pos(pos)}]" if len(labels_shape) > 1 else f"labels[{flat_row}]"
    return ValueError(
        f"{where} = {value} is out of range for vocabulary size V = {vocab} (row {flat_row}); "
        f"labels must satisfy 0 <= label < {vocab} or equal ignore_index = {ignore_index}"
    )


def check_label_range(flat: np.ndarray, labels_shape: tuple, vocab: int, ignore_index: int) -> None:
    """Raise :func:`label_error` for the first label outside ``[0, V)`` that is not ignored."""
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if bad.any():
        row = int(np.argmax(bad))
        raise label_error(labels_shape, row, int(flat[row]), vocab, ignore_index)


def as_host_labels(labels: Any, batch_shape: tuple, vocab: int, ignore_index: int) -> np.ndarray:
    """Validate labels against the logits; return a flat int64 copy ``[N]``."""
    if is_device_array(labels):
        raise TypeError("labels are on the GPU but logits are on the host; put both on the same device")
    arr, tag = _as_numpy(labels, "labels")
    arr = arr if tag is None else decode_to_float64(arr)  # torch f16/bf16 labels arrive as raw bits
    flat = labels_to_int64(arr)
    if flat.shape != tuple(batch_shape):
        raise ValueError(
            f"labels shape {flat.shape} does not match logits shape {tuple(batch_shape) + (vocab,)}: "
            f"expected labels.shape == logits.shape[:-1] == {tuple(batch_shape)}"
        )
    flat = flat.reshape(-1)
    check_label_range(flat, tuple(batch_shape), vocab, ignore_index)
    return flat


def prepare_host(logits: Any, labels: Any | None, ignore_index: int) -> HostBatch:
    """Validate and normalise a host batch (see module docstring)."""
    x, batch_shape, source = as_host_logits(logits)
    y = None if labels is None else as_host_labels(labels, batch_shape, x.shape[1], ignore_index)
    return HostBatch(x, y, batch_shape, source)


# --------------------------------------------------------------------------------------------
# scalars and options
# --------------------------------------------------------------------------------------------
def check_finite_scalar(value: Any, name: str) -> float:
    """A real, finite number (Python, NumPy, 0-d array or 1-element tensor) as a Python float."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got complex {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def decode_to_float64(x: np.ndarray) -> np.ndarray:
    """Decode an encoded logits array (see module docstring) to float64 values, exactly."""
    if x.dtype == BF16:
        with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns must not warn
            return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if x.dtype == F16:
        return x.view(np.float16).astype(np.float64)
    return x.astype(np.float64, copy=False)


def encode_from_float64(values: np.ndarray, encoding: np.dtype) -> np.ndarray:
    """float64 values in an encoding (see the module docstring), rounded to nearest even.

    bfloat16 goes by way of float32 (two roundings; they differ from one only on exact ties).
    """
    encoding = np.dtype(encoding)
    if encoding == BF16:
        return f32_to_bf16_bits(values.astype(np.float32))
    if encoding == F16:
        with np.errstate(over="ignore", invalid="ignore"):
            return values.astype(np.float16).view(np.int16)
    return values.astype(encoding)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a quiet NaN."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded
