"""GPU input for the front door (:mod:`ptx_numba._validate`): zero-copy numba device views.

Imported by the package without importing numba.cuda: it is imported lazily, only when the caller
passed a GPU array.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ._blocks import BF16


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _check_shape(shape: tuple, what: str) -> None:
    if len(shape) < 2:
        raise ValueError(
            f"{what} must have shape [..., V] with at least 2 dimensions (rows x vocabulary); "
            f"got shape {shape}"
        )
    if shape[-1] == 0:
        raise ValueError(f"{what} has an empty vocabulary (V == 0), shape {shape}")


def _device_labels_to_host(labels: Any) -> Any:
    t = labels if _is_torch_tensor(labels) else None
    if t is not None:
        return t.detach().cpu()  # synchronous with respect to torch's stream
    if hasattr(labels, "copy_to_host"):
        return labels.copy_to_host()
    from numba import cuda

    return cuda.as_cuda_array(labels).copy_to_host()


def _dtype_error(dtype: Any) -> str:
    return (
        f"logits on the GPU must be real floats (float16, bfloat16, float32 or float64), got {dtype}; "
        "integer logits are accepted on the host only"
    )


_DEVICE_SOURCE = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64",
                  np.dtype(np.float16): "float16", BF16: "bfloat16"}


def device_logits(obj: Any, what: str = "logits") -> tuple[Any, str]:
    """A numba device array viewing GPU logits (zero copy) and its source dtype name.

    torch's ``__cuda_array_interface__`` names no stream, so torch's current stream is synchronized
    first; bfloat16 tensors are read through an int16 view (torch exports no bfloat16 interface).
    2-D and 3-D arrays keep any strides; more dimensions must be C-contiguous (reshaped to 2-D).
    """
    from numba import cuda

    if _is_torch_tensor(obj):
        torch = sys.modules["torch"]
        t = obj.detach()
        torch.cuda.current_stream(t.device).synchronize()
        if t.dtype == torch.bfloat16:
            arr = cuda.as_cuda_array(t.view(torch.int16)).view(np.uint16)
        elif t.is_complex() or not t.is_floating_point():
            raise TypeError(_dtype_error(t.dtype))
        else:
            arr = cuda.as_cuda_array(t)
    elif type(obj).__name__ == "FakeCUDAArray":  # numba's CUDA simulator
        arr = obj
    else:
        try:
            arr = cuda.as_cuda_array(obj)
        except Exception as exc:
            raise TypeError(f"{what} are not a usable GPU array ({type(exc).__name__}: {exc})") from None
    source = _DEVICE_SOURCE.get(np.dtype(arr.dtype))
    if source is None:
        raise TypeError(_dtype_error(arr.dtype))
    shape = tuple(arr.shape)
    _check_shape(shape, what)
    if len(shape) > 3:
        if not arr.is_c_contiguous():
            raise ValueError(
                f"non-contiguous GPU {what} with {len(shape)} dimensions are not supported (shape "
                f"{shape}); make them contiguous (tensor.contiguous(), cupy.ascontiguousarray) or "
                "reshape to [N, V] / [B, T, V]"
            )
        arr = arr.reshape(math.prod(shape[:-1]), shape[-1])
    return arr, source


