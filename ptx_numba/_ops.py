"""What every public op does between the front door and the finishers: run the row pass (and
the gradient pass) of the chosen backend over the batch's row blocks, and shape the results.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _dispatch, contract
from ._blocks import BF16, F16, RowSource, split
from ._rowpass import GradCoef, RowStats, StatsSpec, concat_stats
from ._validate import Batch, check_finite_scalar, is_device_array


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------
def check_label_smoothing(value: Any) -> float:
    eps = check_finite_scalar(value, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    return eps


def check_z_loss(value: Any) -> float:
    lam = check_finite_scalar(value, "z_loss")
    if lam < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {lam}")
    return lam


def check_softcap(value: Any) -> float:
    """``None`` -> 0.0 (no softcap); else a finite positive number."""
    if value is None:
        return 0.0
    cap = check_finite_scalar(value, "softcap")
    if cap <= 0.0:
        raise ValueError(f"softcap must be > 0 (or None for no softcap), got {cap}")
    return cap


def check_temperature(value: Any) -> float:
    """The inverse of a finite positive temperature."""
    temp = check_finite_scalar(value, "temperature")
    if temp <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temp}")
    inv = 1.0 / temp
    if not math.isfinite(inv):
        raise ValueError(f"temperature {temp} is too small (1/temperature overflows)")
    return inv


# ------------------------------------------------------------------------------------------------
# running the passes
# ------------------------------------------------------------------------------------------------
def stats(batch: Batch, spec: StatsSpec, backend: object) -> tuple[RowStats, str]:
    """The row pass over every block of ``batch``; returns ``(stats of all rows, backend name)``."""

    def call(b):
        return concat_stats([b.row_stats(blk.x, batch.y[blk.start:blk.stop], spec, blk.w)
                             for blk in batch.blocks()], spec)

    return _dispatch.run(backend, on_device=batch.on_device, nbytes=batch.nbytes, call=call)


def grad(batch: Batch, spec: StatsSpec, st: RowStats, coef: GradCoef, out: Any, backend: str) -> None:
    """The gradient pass over every block, written into ``out`` (already checked)."""
    chosen = _dispatch.explicit(backend)
    if batch.on_device:
        x, w = batch._device
        chosen.row_grad(x, batch.y, spec, st, coef, out, w)
        return
    target = RowSource(out, _encoding(out.dtype), True)
    sources = batch._sources + [target]
    for start, stop in split(sources):
        rows = slice(start, stop)
        part_stats = RowStats(*(None if f is None else f[rows] for f in st))
        part_coef = GradCoef(*(None if c is None else c[rows] for c in coef))
        x = sources[0].block(start, stop)
        w = sources[1].block(start, stop) if len(batch._sources) > 1 else None
        view = target.writable_block(start, stop)
        if view is not None:
            chosen.row_grad(x, batch.y[rows], spec, part_stats, part_coef, view, w)
        else:  # a non-unit stride along V: through a contiguous block
            tmp = np.empty((stop - start, batch.vocab), _encoding(out.dtype))
            chosen.row_grad(x, batch.y[rows], spec, part_stats, part_coef, tmp, w)
            target.write_block(start, stop, tmp)


def _encoding(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return BF16
    if dtype.kind == "f" and dtype.itemsize == 2:
        return F16
    return dtype


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
def rows_result(batch: Batch, rows: np.ndarray, backend_name: str):
    """Per-row float64 values shaped like the batch, in the batch's result dtype (on the device
    when the input was)."""
    out = np.asarray(rows, dtype=batch.out_dtype).reshape(batch.batch_shape)
    if batch.on_device:
        return _dispatch.explicit("cuda").to_device(out)
    return out


def reduce(rows: np.ndarray, count: int, reduction: str):
    """``"sum"`` / ``"mean"`` (0.0 with no valid row) of float64 per-row values."""
    total = float(np.sum(rows, dtype=np.float64))
    return total if reduction == "sum" else contract.mean_of(total, count)


def row_weights(batch: Batch, reduction: str, grad_output: Any) -> np.ndarray:
    """Upstream gradient per row (float64 [N]; 0 on ignored rows) for a reduction."""
    valid = batch.valid
    if reduction == "none":
        g = _grad_output_array(grad_output, batch.batch_shape)
    else:
        g = check_finite_scalar(grad_output, "grad_output")
        if reduction == "mean":
            count = int(np.count_nonzero(valid))
            g = g / count if count else 0.0
        g = np.full(batch.n_rows, g)
    return np.where(valid, g, 0.0)


def _grad_output_array(grad_output: Any, shape: tuple) -> np.ndarray:
    if is_device_array(grad_output):
        raise TypeError("grad_output for reduction='none' must be a host array (it has one value per row)")
    try:
        g = np.asarray(grad_output, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"grad_output must be real numbers, got {type(grad_output).__name__}") from None
    if g.shape != tuple(shape):
        raise ValueError(f"grad_output shape {g.shape} does not match labels shape {tuple(shape)} "
                         "(reduction='none' takes one upstream gradient per row)")
    if not np.isfinite(g).all():
        raise ValueError("grad_output must be finite")
    return g.reshape(-1)


def check_out(out: Any, logits: Any, labels: Any, grad_dtype: np.dtype, shape: tuple):
    """Validate a caller's gradient buffer, or allocate one (host input)."""
    if out is None:
        return np.empty(shape, dtype=grad_dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array for host logits, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out shape {out.shape} does not match logits shape {tuple(shape)}")
    if out.dtype != grad_dtype:
        raise ValueError(f"out dtype {out.dtype} does not match the gradient dtype {grad_dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if isinstance(labels, np.ndarray) and np.shares_memory(out, labels):
        raise ValueError("out overlaps labels")
    if isinstance(logits, np.ndarray) and np.shares_memory(out, logits):
        same = (out.__array_interface__["data"][0] == logits.__array_interface__["data"][0]
                and out.strides == logits.strides)
        if not same:
            raise ValueError("out overlaps logits without being logits itself; pass out=logits for an "
                             "in-place backward, or a separate array")
    return out


def grad_dtype_of(batch: Batch, logits: Any) -> np.dtype:
    """The gradient has the logits' dtype for the four float encodings, else float64/float32."""
    dtype = getattr(logits, "dtype", None)
    if isinstance(dtype, np.dtype) and (dtype.kind == "f" and dtype.itemsize in (2, 4, 8)
                                        or dtype.name == "bfloat16"):
        return dtype.newbyteorder("=")
    return batch.out_dtype if batch.source_dtype in ("float32", "float64") else np.dtype(np.float32)


def device_out(batch: Batch, out: Any):
    """The gradient buffer for GPU input: the caller's (checked) or a new device array."""
    from numba import cuda

    from ._validate import device_logits

    x, _ = batch._device
    if out is None:
        return cuda.device_array(x.shape, dtype=x.dtype)
    arr, _ = device_logits(out, "out")
    if tuple(arr.shape) != tuple(x.shape) or np.dtype(arr.dtype) != np.dtype(x.dtype):
        raise ValueError(f"out (shape {tuple(arr.shape)}, dtype {arr.dtype}) must match the logits "
                         f"(shape {tuple(x.shape)}, dtype {x.dtype})")
    return arr


class Saved:
    """What a forward keeps for its backward: O(N) statistics, never an N x V buffer."""

    __slots__ = ("stats", "spec", "backend", "options")

    def __init__(self, stats: RowStats, spec: StatsSpec, backend: str, options: dict):
        self.stats, self.spec, self.backend, self.options = stats, spec, backend, options
