"""Transitional module-level protocol of the old public layer, as thin wrappers over the row pass.

The old public layer (:mod:`ptx_numba.api`, :mod:`ptx_numba._dispatch`) calls these loose
functions; they run :func:`ptx_numba.gpu.rowpass.stats_on_device` and finish on the host in
float64 (``lse = m + log s``, ``ce = log s - (z_y - m)``; sums and counts over the N per-row
values). They go away when the public layer moves to :data:`ptx_numba.gpu.BACKEND`.

* host: :func:`logsumexp_rows`, :func:`cross_entropy_rows`, :func:`cross_entropy_sum` take the
  normalised host batch of :mod:`ptx_numba._validate`.
* device: :func:`device_logsumexp`, :func:`device_cross_entropy`, :func:`device_cross_entropy_sum`
  take GPU-resident logits (numba device arrays, CuPy arrays, torch CUDA tensors; bfloat16 torch
  tensors through an int16 view) and read them in place; 2-D and 3-D logits with any strides,
  more dimensions only when C-contiguous. Labels are checked on the host with the host messages.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .._rowpass import StatsSpec
from .._validate import as_host_labels, check_ignore_index, check_reduction
from ._device import numba_cuda
from .kernels import on_simulator

_DEVICE_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.float16): "f16"}


def _launch_rows(x, labels: np.ndarray | None, ignore_index: int) -> np.ndarray:
    """Per-row float64 lse (``labels`` None) or CE (0.0 on ignored rows) of a host or device block."""
    from .rowpass import stats_on_device

    nrows = int(np.prod(tuple(x.shape)[:-1]))
    if labels is None:
        y = np.full(nrows, -1, dtype=np.int64)
    else:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        y = np.where(labels == ignore_index, -1, labels)
    out = stats_on_device(x, y, StatsSpec(target=labels is not None))
    if out is None:
        return np.zeros(0)
    m, s, target = out.copy_to_host()[:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.log(s)
        if labels is None:
            return m + log_s
        return np.where(y < 0, 0.0, log_s - (target - m))


def _sum_count(rows: np.ndarray, labels: np.ndarray, ignore_index: int) -> tuple[float, int]:
    valid = np.asarray(labels).reshape(-1) != ignore_index
    return float(np.sum(rows[valid], dtype=np.float64)), int(np.count_nonzero(valid))


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp of an encoded host batch ``[N, V]``, on the GPU (float64 ``[N]``)."""
    return _launch_rows(x, None, 0)


def cross_entropy_rows(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """Per-row cross entropy of an encoded host batch (float64 ``[N]``, 0.0 on ignored rows)."""
    return _launch_rows(x, labels, int(ignore_index))


def cross_entropy_sum(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> tuple[float, int]:
    """``(sum of per-row CE over non-ignored rows, their count)``; the sum is taken in float64."""
    return _sum_count(_launch_rows(x, labels, int(ignore_index)), labels, int(ignore_index))


# ------------------------------------------------------------------------------------------------
# device protocol
# ------------------------------------------------------------------------------------------------
def _torch_tensor(obj: Any):
    """``obj`` if it is a torch tensor (looked up only if the caller imported torch), else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj
    return None


def _as_device(obj: Any):
    """A numba device array viewing ``obj``, and its encoding. Zero copy."""
    cuda = numba_cuda()
    t = _torch_tensor(obj)
    if t is not None:
        torch = sys.modules["torch"]
        t = t.detach()
        if t.device.type != "cuda":
            raise TypeError(f"expected a CUDA tensor, got one on {t.device}")
        # torch's __cuda_array_interface__ names no stream: wait for the producer here.
        torch.cuda.current_stream(t.device).synchronize()
        if t.dtype == torch.bfloat16:
            return cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16), "bf16"
        if t.is_complex() or not t.is_floating_point():
            raise TypeError(_dtype_error(t.dtype))
        arr = cuda.as_cuda_array(t)
        return arr, _DEVICE_DTYPES[np.dtype(arr.dtype)]
    if on_simulator() and type(obj).__name__ == "FakeCUDAArray":
        arr = obj
    else:
        try:
            arr = cuda.as_cuda_array(obj)
        except Exception as exc:
            raise TypeError(f"logits are not a usable GPU array ({type(exc).__name__}: {exc})") from None
    enc = _DEVICE_DTYPES.get(np.dtype(arr.dtype))
    if enc is None:
        raise TypeError(_dtype_error(arr.dtype))
    return arr, enc


def _dtype_error(dtype: Any) -> str:
    return (
        f"logits on the GPU must be real floats (float16, bfloat16, float32 or float64), got {dtype}; "
        "integer logits are accepted on the host only"
    )


def _device_batch(logits: Any):
    """Validate device logits.

    Returns ``(array of ndim 2 or 3, encoding, batch_shape, vocab, out dtype)``.
    """
    arr, enc = _as_device(logits)
    shape = tuple(arr.shape)
    if len(shape) < 2:
        raise ValueError(
            f"logits must have shape [..., V] with at least 2 dimensions (rows x vocabulary); "
            f"got shape {shape}"
        )
    if shape[-1] == 0:
        raise ValueError(f"logits has an empty vocabulary (V == 0), shape {shape}")
    batch_shape = shape[:-1]
    if len(shape) > 3:
        if not arr.is_c_contiguous():
            raise ValueError(
                f"non-contiguous GPU logits with {len(shape)} dimensions are not supported (shape "
                f"{shape}); make them contiguous (tensor.contiguous(), cupy.ascontiguousarray) or "
                "reshape to [N, V] / [B, T, V]"
            )
        arr = arr.reshape(int(np.prod(batch_shape)), shape[-1])
    out_dtype = np.dtype(np.float64 if enc == "f64" else np.float32)
    return arr, enc, batch_shape, shape[-1], out_dtype


def _device_labels(labels: Any, batch_shape: tuple, vocab: int, ignore_index: int):
    """Check labels on the host (same messages as host input); return them as int64 [N] on the host."""
    cuda = numba_cuda()
    t = _torch_tensor(labels)
    if t is not None:
        host = t.detach().cpu()  # synchronous with respect to torch's stream
    elif on_simulator() and type(labels).__name__ == "FakeCUDAArray":
        host = labels.copy_to_host()
    elif labels is not None and not isinstance(labels, np.ndarray) and hasattr(labels, "__cuda_array_interface__"):
        host = cuda.as_cuda_array(labels).copy_to_host()
    else:
        host = labels
    return as_host_labels(host, batch_shape, vocab, ignore_index)


def _result(values: np.ndarray, dtype, batch_shape: tuple):
    """Per-row host values as a device array shaped like the batch (ready when returned)."""
    return numba_cuda().to_device(np.ascontiguousarray(values, dtype=dtype)).reshape(batch_shape)


def device_logsumexp(logits: Any):
    """Log-sum-exp over the last axis of GPU-resident logits.

    Returns
    -------
    numba device array, shape logits.shape[:-1]
        float64 for float64 logits, else float32.
    """
    arr, _, batch_shape, _, out_dtype = _device_batch(logits)
    return _result(_launch_rows(arr, None, 0), out_dtype, batch_shape)


def device_cross_entropy(logits: Any, labels: Any, ignore_index: int, reduction: str):
    """Cross entropy of GPU-resident logits.

    Returns
    -------
    float or numba device array
        A Python float for "mean" (0.0 when no row is valid) and "sum"; for "none" a device array
        shaped like labels, float64 for float64 logits else float32, 0.0 on ignored rows.
    """
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    arr, _, batch_shape, vocab, out_dtype = _device_batch(logits)
    flat = _device_labels(labels, batch_shape, vocab, ignore_index)
    rows = _launch_rows(arr, flat, ignore_index)
    if reduction == "none":
        return _result(rows, out_dtype, batch_shape)
    total, count = _sum_count(rows, flat, ignore_index)
    if reduction == "sum":
        return total
    return total / count if count else 0.0


def device_cross_entropy_sum(logits: Any, labels: Any, ignore_index: int) -> tuple[float, int]:
    """``(sum of CE over non-ignored rows, their count)`` for GPU-resident logits."""
    ignore_index = check_ignore_index(ignore_index)
    arr, _, batch_shape, vocab, _ = _device_batch(logits)
    flat = _device_labels(labels, batch_shape, vocab, ignore_index)
    return _sum_count(_launch_rows(arr, flat, ignore_index), flat, ignore_index)
