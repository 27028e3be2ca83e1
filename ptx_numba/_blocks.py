"""Row blocks: how a host logits array of any layout reaches the kernels as 2-D views.

Used by :mod:`ptx_numba._validate` (the front door) only. :class:`RowSource` splits the rows of an
``[..., V]`` array into *natural ranges*: runs of rows that one 2-D strided view can address (one
range for any array whose leading dimensions collapse, e.g. C order or ``x[:, :V - 1]``; ``B``
ranges for ``x[:, :-1]`` of a ``[B, T, V]`` array). A range is read in place when the array needs
no value conversion and its stride along V is the item size; otherwise its rows are converted in
sub-blocks of at most ``config.COPY_BLOCK_BYTES``.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import config

BF16 = np.dtype(np.uint16)  # encoding of bfloat16 bits
F16 = np.dtype(np.int16)  # encoding of float16 bits
ENCODINGS = (np.dtype(np.float32), np.dtype(np.float64), BF16, F16)


def encoding_of(dtype: np.dtype) -> tuple[np.dtype, str, bool]:
    """``(encoding, source name, direct)`` for a real NumPy dtype.

    ``direct``: the stored bytes can be read as the encoding (no value conversion). Raises
    ``TypeError`` for non-real dtypes.
    """
    name = dtype.name
    if name == "bfloat16":  # ml_dtypes / jax arrays
        return BF16, "bfloat16", dtype.isnative
    if dtype.itemsize == 1 and dtype.fields is None and name.startswith(("float8", "float6", "float4")):
        return np.dtype(np.float32), "float32", False  # ml_dtypes' small floats (kind "V" or "f"): via float32
    if dtype.kind == "f":
        if dtype.itemsize == 2:
            return F16, "float16", dtype.isnative
        if dtype.itemsize == 4:
            return np.dtype(np.float32), "float32", dtype.isnative
        if dtype.itemsize == 8:
            return np.dtype(np.float64), "float64", dtype.isnative
        return np.dtype(np.float64), "float64", False  # long double: computed in float64
    if dtype.kind in "iu":
        return np.dtype(np.float64), "float64", False
    if dtype.kind == "b":
        raise TypeError("logits must be real numbers, got a boolean array")
    raise TypeError(f"logits must be real numbers, got dtype {dtype}")


def _convert(block: np.ndarray, encoding: np.dtype) -> np.ndarray:
    """Rows of the caller's array -> a new C-contiguous array in ``encoding``."""
    dtype = block.dtype
    if dtype == encoding:  # already encoded (torch half tensors arrive as bits): copy, never convert
        return np.ascontiguousarray(block)
    if dtype.name == "bfloat16":
        return np.ascontiguousarray(block.astype(dtype.newbyteorder("="))).view(BF16)
    if encoding == F16:
        return np.ascontiguousarray(block.astype(np.float16)).view(F16)
    return np.ascontiguousarray(block.astype(encoding))


class RowSource:
    """The rows of an ``[..., V]`` array as 2-D blocks (see the module docstring)."""

    def __init__(self, arr: np.ndarray, encoding: np.dtype, direct: bool):
        self.arr = arr
        self.encoding = encoding
        self.vocab = arr.shape[-1]
        lead = arr.shape[:-1]
        self.n_rows = math.prod(lead)
        unit = arr.strides[-1] == arr.itemsize or self.vocab == 1
        self.in_place = direct and unit
        # the longest suffix of the leading dims that collapses into one strided row dimension
        k = len(lead) - 1
        while k > 0 and (lead[k] == 1 or lead[k - 1] == 1
                         or arr.strides[k - 1] == arr.strides[k] * lead[k]):
            k -= 1
        self._outer = lead[:k]
        self._inner_rows = math.prod(lead[k:])
        inner_strides = [st for st, n in zip(arr.strides[k:-1], lead[k:]) if n > 1]
        self._row_stride = inner_strides[-1] if inner_strides else arr.strides[-1] * self.vocab

    def ranges(self) -> list[int]:
        """Boundaries (0, ..., N) of the natural ranges."""
        if self.n_rows == 0:
            return [0, 0]
        step = self._inner_rows
        return list(range(0, self.n_rows + 1, step)) if step else [0, 0]

    def _rows(self, start: int, stop: int, writeable: bool = False) -> np.ndarray:
        """Rows ``[start, stop)`` (inside one natural range) as a 2-D view in the caller's dtype."""
        index, first = divmod(start, self._inner_rows)
        outer = np.unravel_index(index, self._outer) if self._outer else ()
        base = self.arr[outer] if outer else self.arr
        raw = base.view(np.dtype((np.void, base.itemsize)))  # as_strided rejects e.g. float8_e5m2's "<f1"
        view = as_strided(raw, shape=(self._inner_rows, self.vocab),
                          strides=(self._row_stride, self.arr.strides[-1]), writeable=writeable).view(base.dtype)
        return view[first:first + (stop - start)]

    def writable_block(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``[start, stop)`` as a writable encoded view, or None if they cannot be one."""
        if not self.in_place:
            return None
        rows = self._rows(start, stop, writeable=True)
        return rows.view(self.encoding) if rows.dtype != self.encoding else rows

    def write_block(self, start: int, stop: int, values: np.ndarray) -> None:
        """Store encoded ``values`` into rows ``[start, stop)`` of the caller's array."""
        self._rows(start, stop, writeable=True)[...] = values.view(self.arr.dtype)

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (inside one natural range) as an encoded 2-D array."""
        rows = self._rows(start, stop)
        if self.in_place:
            view = rows.view(self.encoding) if rows.dtype != self.encoding else rows
            return view
        copy = _convert(rows, self.encoding)
        copy.flags.writeable = False  # blocks are inputs: read-only whether viewed or converted
        return copy

    def max_rows_per_copy(self) -> int:
        """Rows per converted sub-block (all rows of a range when read in place)."""
        if self.in_place:
            return max(self.n_rows, 1)
        return max(1, config.COPY_BLOCK_BYTES // max(1, self.vocab * 8))


def split(sources: list[RowSource]) -> Iterator[tuple[int, int]]:
    """Row ranges that every source can serve as one block (union of boundaries, size-capped)."""
    bounds = sorted(set().union(*(s.ranges() for s in sources)))
    cap = min(s.max_rows_per_copy() for s in sources)
    for lo, hi in zip(bounds, bounds[1:]):
        for start in range(lo, hi, cap):
            yield start, min(start + cap, hi)


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
