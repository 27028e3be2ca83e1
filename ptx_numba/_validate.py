"""The single front door: every input check and coercion, host and device, for every op.

A public function calls :func:`prepare` once; the backends receive what it returns (the block
inputs of :mod:`ptx_numba._rowpass`) and never look at user input themselves.

Logits are read in one of four *encodings* (the kernels specialise on the array dtype):

==============  =====================================================
array dtype     meaning
==============  =====================================================
``float32``     float32 logits
``float64``     float64 logits
``uint16``      bfloat16 logits, raw bits (value = bits << 16 as f32)
``int16``       IEEE float16 logits, raw bits
==============  =====================================================

Half-width inputs stay half-width so the kernels read half the bytes. Host logits are handed out as
*row blocks*: 2-D ``[n, V]`` read-only views with unit stride along V and any row stride, taken in
place whenever the rows are contiguous inside (``logits[:, :-1]`` of a ``[B, T, V]`` batch is ``B``
blocks of ``T - 1`` rows). Only inputs whose values must be converted (another byte order, a
non-unit stride along V, integer or 8-bit float logits) are copied, one row block of at most
``config.COPY_BLOCK_BYTES`` at a time, so extra memory stays O(block) for every input.

Labels become one C-contiguous ``int64`` copy ``[N]`` (never the caller's buffer) holding the label,
or ``-1`` where the row is ignored; every other value was checked to lie in ``[0, V)``.
"""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np

from . import config
from ._device_input import (  # noqa: F401 (part of the front door)
    _check_shape, _device_labels_to_host, _is_torch_tensor, device_logits,
)
from ._blocks import (  # noqa: F401  (the encodings are part of the front door's vocabulary)
    BF16, ENCODINGS, F16, RowSource, decode_to_float64, encode_from_float64, encoding_of,
    f32_to_bf16_bits, split,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------------
# helpers about foreign array types (never import torch: look it up only if the caller did)
# --------------------------------------------------------------------------------------------
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
def host_rows(logits: Any, what: str = "logits") -> tuple[RowSource, str]:
    """Validate host logits; return their :class:`~._blocks.RowSource` and source dtype name."""
    arr, tag = _as_numpy(logits, what)
    if tag is not None:  # torch bf16/fp16 tensors arrive as 16-bit encodings already
        encoding, source, direct = arr.dtype, tag, True
    else:
        encoding, source, direct = encoding_of(arr.dtype)
    _check_shape(arr.shape, what)
    return RowSource(arr, encoding, direct), source


def as_host_logits(logits: Any) -> tuple[np.ndarray, tuple, str]:
    """Validated logits as ONE encoded ``[N, V]`` array (a copy unless they are C-contiguous).

    For tools that need the whole array at once; the ops go through :func:`prepare`, which never
    copies more than a row block.
    """
    rows, source = host_rows(logits)
    arr = rows.arr
    parts = [rows.block(lo, hi) for lo, hi in split([rows])]
    if not parts:
        x = np.zeros((0, rows.vocab), rows.encoding)
    else:
        x = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts))
    x = x.view()
    x.flags.writeable = False  # the kernels only read; this also guards the caller's buffer
    return x, arr.shape[:-1], source


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
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if not bad.any():  # integral but outside int64 would wrap (2**63 -> -2**63)
            big = np.abs(arr) >= np.float64(2.0**63)  # a float16 2**63 would overflow (and warn)
            if big.any():
                pos = np.unravel_index(int(np.argmax(big)), arr.shape)
                raise ValueError(f"labels[{_fmt_pos(pos)}] = {arr[pos]!r} is too large for int64")
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
    """Validate labels against the logits; return a flat int64 copy ``[N]`` (values as given)."""
    if labels is None:
        raise TypeError("labels is None; expected an array")
    if is_device_array(labels):
        labels = _device_labels_to_host(labels)
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


def kernel_labels(flat: np.ndarray, ignore_index: int) -> np.ndarray:
    """Checked labels -> the kernels' form: the label, or -1 where the row is ignored."""
    if not INT64_MIN <= ignore_index <= INT64_MAX:  # no int64 label can equal it
        return flat
    return np.where(flat == ignore_index, np.int64(-1), flat)


# --------------------------------------------------------------------------------------------
# the batch
# --------------------------------------------------------------------------------------------
class Block(NamedTuple):
    """Rows ``[start, stop)`` of the flattened batch as the backends read them."""

    start: int
    stop: int
    x: Any  #: encoded 2-D host view, or the whole device array
    w: Any  #: the second logit set's block, or None


@dataclass
class Batch:
    """A validated batch: what every op hands to the backends."""

    batch_shape: tuple
    vocab: int
    source_dtype: str  #: "float32", "float64", "bfloat16" or "float16" (of ``logits``)
    y: np.ndarray  #: int64 [N]: label, or -1 for ignored / no label
    on_device: bool
    _sources: list = field(default_factory=list)
    _device: tuple = ()

    @property
    def n_rows(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def valid(self) -> np.ndarray:
        """Rows with a label (bool [N])."""
        return self.y >= 0

    @property
    def out_dtype(self) -> np.dtype:
        """float64 for float64 logits, float32 for every narrower float."""
        return np.dtype(np.float64 if self.source_dtype == "float64" else np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of encoded logits (what the kernels read)."""
        itemsize = 8 if self.source_dtype == "float64" else 4 if self.source_dtype == "float32" else 2
        return self.n_rows * self.vocab * itemsize

    def blocks(self) -> Iterator[Block]:
        """Row blocks in order (host: bounded views/copies; device: one block)."""
        if self.on_device:
            x, w = self._device
            yield Block(0, self.n_rows, x, w)
            return
        for start, stop in split(self._sources):
            parts = [src.block(start, stop) for src in self._sources]
            yield Block(start, stop, parts[0], parts[1] if len(parts) > 1 else None)


def prepare(logits: Any, labels: Any = None, *, ignore_index: int = config.DEFAULT_IGNORE_INDEX,
            other: Any = None, labels_name: str = "labels", other_name: str = "ref_logits") -> Batch:
    """Validate and normalise the inputs of one op call (see the module docstring).

    ``labels=None``: no labels (every row gets ``y = -1``). ``other``: a second logit set of the
    same shape (its dtype may differ), read block by block beside ``logits``.
    """
    if is_device_array(logits):
        x, source = device_logits(logits)
        shape = _logical_shape(logits, x)
        w = None
        if other is not None:
            if not is_device_array(other):
                raise TypeError(f"logits are on the GPU but {other_name} are on the host; put both on the same device")
            w, _ = device_logits(other, other_name)
            if _logical_shape(other, w) != shape:
                raise ValueError(f"{other_name} shape {_logical_shape(other, w)} does not match logits shape {shape}")
        batch_shape, vocab = shape[:-1], shape[-1]
        sources, device = [], (x, w)
    else:
        if other is not None and is_device_array(other):
            raise TypeError(f"{other_name} are on the GPU but logits are on the host; put both on the same device")
        rows, source = host_rows(logits)
        sources = [rows]
        batch_shape, vocab = rows.arr.shape[:-1], rows.vocab
        if other is not None:
            rows_w, _ = host_rows(other, other_name)
            if rows_w.arr.shape != rows.arr.shape:
                raise ValueError(f"{other_name} shape {rows_w.arr.shape} does not match logits shape "
                                 f"{rows.arr.shape}: the two logit sets must have the same shape")
            sources.append(rows_w)
        device = ()
    if labels is None:
        y = np.full(math.prod(batch_shape), -1, dtype=np.int64)
    else:
        try:
            y = kernel_labels(as_host_labels(labels, batch_shape, vocab, ignore_index), ignore_index)
        except (ValueError, TypeError) as exc:
            if labels_name == "labels":
                raise
            raise type(exc)(str(exc).replace("labels", labels_name)) from None
    return Batch(tuple(batch_shape), vocab, source, y, bool(device), sources, device)


def _logical_shape(obj: Any, arr: Any) -> tuple:
    """The caller's shape (before a >3-D device array was reshaped to 2-D)."""
    shape = getattr(obj, "shape", None)
    return tuple(shape) if shape is not None else tuple(arr.shape)


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
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {value!r:.40}") from None
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
