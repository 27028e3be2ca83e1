"""Host <-> device plumbing of the ``cuda`` backend: array views, copies, launch configuration.

Block inputs come from :mod:`ptx_numba._validate`: host arrays of one encoding (float32, float64,
uint16 = bfloat16 bits, int16 = float16 bits) with unit stride along V, or numba device arrays
(float32, float64, float16, uint16 = bfloat16 bits; int16 = float16 bits is accepted too).
"""
from __future__ import annotations

import warnings

import numpy as np

from .. import config
from ..errors import KernelUnavailable

#: Host arrays that are not C-contiguous are copied to the device in row blocks of about this
#: many bytes, so the host never holds a second copy of the whole batch.
HOST_COPY_BLOCK_BYTES = 64 * 1024 * 1024

_ENCODING_OF = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.float16): "f16",
    np.dtype(np.int16): "f16",  # float16 bits: read as real float16 on the device
    np.dtype(np.uint16): "bf16",
}


def numba_cuda():
    """``numba.cuda`` (imported on first use: the package must import without it)."""
    from numba import cuda

    return cuda


def kernels():
    """The kernel package (imported on first use: it imports numba.cuda)."""
    from . import kernels as k

    return k


def is_device_array(obj) -> bool:
    """Whether ``obj`` is a numba device array (real or simulated); host arrays are not."""
    return not isinstance(obj, np.ndarray) and hasattr(obj, "copy_to_host")


def launch_config() -> tuple[int, int, bool]:
    """``(threads_per_block, max_blocks, use_shuffle)``, read from config at call time."""
    tpb = int(config.CUDA_THREADS_PER_BLOCK)
    if tpb % 32 or not 32 <= tpb <= 1024:
        raise ValueError(f"config.CUDA_THREADS_PER_BLOCK must be a multiple of 32 in [32, 1024], got {tpb}")
    max_blocks = int(config.CUDA_MAX_BLOCKS)
    if max_blocks < 1:
        raise ValueError(f"config.CUDA_MAX_BLOCKS must be >= 1, got {max_blocks}")
    # The simulator has no warp shuffles, so it always takes the shared-memory tree.
    shuffle = config.CUDA_USE_SHUFFLE
    use_shuffle = (True if shuffle is None else bool(shuffle)) and not kernels().on_simulator()
    return tpb, max_blocks, use_shuffle


def _f16_view(arr):
    return arr.view(np.float16) if arr.dtype == np.int16 else arr


def to_device_block(x):
    """``(device array, encoding)`` of a block: device arrays are viewed, host ones copied.

    A host block with rows strided apart is copied in row blocks into a C-contiguous device array.
    """
    enc = _ENCODING_OF.get(np.dtype(x.dtype))
    if enc is None:
        raise TypeError(f"unexpected encoding {x.dtype}; expected float32, float64, float16, uint16 or int16")
    if is_device_array(x):
        return _f16_view(x), enc
    cuda = numba_cuda()
    host = _f16_view(np.asarray(x))
    if host.flags.c_contiguous:
        return cuda.to_device(host), enc
    dev = cuda.device_array(host.shape, dtype=host.dtype)
    step = max(1, HOST_COPY_BLOCK_BYTES // max(1, host.shape[-1] * host.itemsize))
    for start in range(0, host.shape[0], step):
        stop = min(start + step, host.shape[0])
        dev[start:stop].copy_to_device(np.ascontiguousarray(host[start:stop]))
    return dev, enc


def copy_back(dev, out: np.ndarray) -> None:
    """Copy a C-contiguous device array into the host array ``out`` (any row stride)."""
    target = _f16_view(out)
    if target.flags.c_contiguous:
        dev.copy_to_host(target)
        return
    step = max(1, HOST_COPY_BLOCK_BYTES // max(1, out.shape[-1] * out.itemsize))
    for start in range(0, out.shape[0], step):
        stop = min(start + step, out.shape[0])
        target[start:stop] = dev[start:stop].copy_to_host()


def as_3d(arr):
    """A 3-D ``[B, T, V]`` view of a 2-D ``[N, V]`` (as ``[N, 1, V]``) or 3-D device array, no copy.

    The kernels are compiled for 3-D arrays of any layout only, so one compiled kernel serves
    2-D and 3-D input of every stride pattern (see :mod:`ptx_numba.gpu.kernels.stats`).
    """
    if arr.ndim == 3:
        return arr
    if arr.ndim != 2:
        raise ValueError(f"the cuda kernels read 2-D or 3-D logits, got shape {tuple(arr.shape)}")
    n, v = (int(d) for d in arr.shape)
    if kernels().on_simulator():
        return arr.reshape(n, 1, v)  # a NumPy view underneath: adding a unit axis never copies
    return numba_cuda().from_cuda_array_interface(view_3d_interface(arr), owner=arr, sync=False)


def view_3d_interface(arr) -> dict:
    """The ``__cuda_array_interface__`` of ``arr[:, None, :]`` for a 2-D device array."""
    desc = dict(arr.__cuda_array_interface__)
    s0, s1 = (int(s) for s in arr.strides)
    n, v = (int(d) for d in arr.shape)
    desc.update(shape=(n, 1, v), strides=(s0, s0, s1), mask=None)
    return desc


def rows_and_inner(arr) -> tuple[int, int]:
    """``(rows, inner)`` of a 3-D ``[B, T, V]`` array: ``B * T`` rows, ``inner = T``."""
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {tuple(arr.shape)}")
    return int(arr.shape[0]) * int(arr.shape[1]), max(1, int(arr.shape[1]))


def compiled(get_kernel, key):
    """``get_kernel(key)`` (compiles on first use); compile failures become KernelUnavailable."""
    try:
        return get_kernel(key)
    except Exception as exc:
        raise_if_unavailable(exc)
        raise


def launch(kernel, grid: int, tpb: int, *args) -> None:
    """Launch ``kernel[grid, tpb](*args)``; compile/driver failures become KernelUnavailable."""
    try:
        with warnings.catch_warnings():
            # Small batches give small grids, and numba-cuda warns below 128 blocks; the grid is
            # one block per row by design, so the warning is noise (and an error under -W error).
            warnings.filterwarnings("ignore", message="Grid size .* under-utilization")
            kernel[grid, tpb](*args)
    except Exception as exc:
        raise_if_unavailable(exc)
        raise


def raise_if_unavailable(exc: BaseException) -> None:
    """Turn a compile/driver failure into :class:`KernelUnavailable` (auto falls back on it)."""
    from numba.core.errors import NumbaError

    missing = ("CudaSupportError", "NvvmSupportError", "NvrtcSupportError", "DynamicLibNotFoundError",
               "CudaDriverError", "LinkerError")
    if isinstance(exc, NumbaError) or type(exc).__name__ in missing:
        raise KernelUnavailable(f"the cuda kernel could not be compiled or launched: {exc}") from exc
