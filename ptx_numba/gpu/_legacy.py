"""CUDA backend (numba.cuda): fused log-sum-exp / cross entropy, one block per row.

Two protocols, both used by :mod:`ptx_numba.api`:

* **host**: :func:`logsumexp_rows`, :func:`cross_entropy_rows`, :func:`cross_entropy_sum` take the
  normalised host batch of :mod:`ptx_numba._validate` (``x``: C-contiguous ``[N, V]`` float32,
  float64, uint16 = bfloat16 bits or int16 = float16 bits; ``labels``: int64 ``[N]``), copy it to
  the GPU, and bring back per-row float64 results, or only ``(sum, count)`` for the sum.
* **device**: :func:`device_logsumexp`, :func:`device_cross_entropy`,
  :func:`device_cross_entropy_sum` take GPU-resident logits (anything with
  ``__cuda_array_interface__``: numba device arrays, CuPy arrays, torch CUDA tensors; simulator
  arrays under ``NUMBA_ENABLE_CUDASIM=1``) and read them in place, without a copy.

Device inputs
-------------
* dtypes: float32, float64, float16; bfloat16 for torch tensors (read through an int16 view, since
  torch exports no ``__cuda_array_interface__`` for bfloat16). Anything else raises ``TypeError``.
* layout: 2-D and 3-D logits are read in place with any strides (e.g. ``logits[:, :-1]``);
  logits with more than 3 dimensions must be C-contiguous, else ``ValueError`` (no hidden copy).
* labels may live on the host or the device. They are copied to the host (``N`` integers, tiny next
  to the ``N x V`` logits) to be checked with the same code and messages as host input, *before*
  any launch, and the checked int64 copy is sent back to the device.

Streams
-------
Kernels run on Numba's default stream. Before a launch on a torch tensor, torch's current stream is
synchronized (torch's ``__cuda_array_interface__`` names no stream); CuPy's interface names its
stream and Numba synchronizes on it. Per-row results returned as device arrays are ready when the
function returns (the default stream is synchronized), so any stream may consume them; scalar
results come back through a synchronous copy.

Numerics
--------
Per-row results are computed as in :mod:`ptx_numba._cuda_kernels`: float32 accumulation for
float32/float16/bfloat16 input, float64 for float64, ``ce = log(s) - (z_y - m)`` finished in
float64, and the batch sum accumulated in float64 by atomics (so its last bits may vary from run
to run). float32 results are within 2e-5 of the float64 value relative to ``max(1, |exact|)``.
Special values (all ``-inf`` row, ``+inf``, NaN) follow :mod:`ptx_numba.reference`.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

from . import config
from ._validate import as_host_labels, check_ignore_index, check_reduction

NAME = "cuda"

_SIM_HINT = (
    "set NUMBA_ENABLE_CUDASIM=1 before numba is first imported to run the cuda backend on "
    "Numba's CUDA simulator (slow; for testing)"
)
_DEVICE_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.float16): "f16"}


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------
def _numba_cuda():
    from numba import cuda

    return cuda


def _kernels():
    # Imported on first use: it imports numba.cuda, which the package must not need at import.
    from . import _cuda_kernels

    return _cuda_kernels


def is_available() -> tuple[bool, str]:
    """Whether the backend can run here: ``(ok, reason)``; never raises.

    True on a machine with a working CUDA driver and GPU, and under the simulator.
    """
    try:
        cuda = _numba_cuda()
    except Exception as exc:
        return False, (
            f"numba.cuda cannot be imported ({type(exc).__name__}: {exc}); install numba-cuda "
            f"(pip install 'ptx_numba[cuda]') on a machine with a CUDA GPU, or {_SIM_HINT}"
        )
    try:
        if _kernels().on_simulator():
            return True, ""
        if cuda.is_available():
            return True, ""
        return False, f"no usable CUDA GPU or driver (numba.cuda.is_available() is False); {_SIM_HINT}"
    except Exception as exc:
        return False, f"numba.cuda failed to initialise ({type(exc).__name__}: {exc}); {_SIM_HINT}"


def prefers_host_input(nbytes: int) -> bool:
    """Whether ``auto`` should send a host batch of ``nbytes`` here: a real GPU and a big batch."""
    if nbytes < config.CUDA_AUTO_MIN_HOST_BYTES:
        return False
    try:
        return not _kernels().on_simulator() and _numba_cuda().is_available()
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
def _launch_config() -> tuple[int, int, bool]:
    """``(threads_per_block, max_blocks, use_shuffle)``, read from config at call time."""
    tpb = int(config.CUDA_THREADS_PER_BLOCK)
    if tpb % 32 or not 32 <= tpb <= 1024:
        raise ValueError(f"config.CUDA_THREADS_PER_BLOCK must be a multiple of 32 in [32, 1024], got {tpb}")
    max_blocks = int(config.CUDA_MAX_BLOCKS)
    if max_blocks < 1:
        raise ValueError(f"config.CUDA_MAX_BLOCKS must be >= 1, got {max_blocks}")
    # The simulator has no warp shuffles, so it always takes the shared-memory tree.
    shuffle = config.CUDA_USE_SHUFFLE
    use_shuffle = (True if shuffle is None else bool(shuffle)) and not _kernels().on_simulator()
    return tpb, max_blocks, use_shuffle


def _run_rows(x, encoding: str, nrows: int, d_labels, ignore_index: int, out):
    """Launch the row kernel over ``x`` ([N, V] or [B, T, V] on the device).

    ``d_labels``: int64 [N] device array, or None for log-sum-exp. ``out``: device array [N] for
    per-row results, or None. Returns the float64 device array ``[sum, count]`` (zeros without
    labels).
    """
    cuda = _numba_cuda()
    tpb, max_blocks, use_shuffle = _launch_config()
    totals = cuda.to_device(np.zeros(2, dtype=np.float64))
    if nrows == 0:
        return totals
    has_labels = d_labels is not None
    if d_labels is None:
        d_labels = cuda.to_device(np.zeros(1, dtype=np.int64))
    write_rows = out is not None
    if out is None:
        out = cuda.device_array(1, dtype=np.float64)
    inner = x.shape[1] if x.ndim == 3 else 1
    kernel = _kernels().get_kernel(encoding, x.ndim, tpb, use_shuffle)
    grid = min(nrows, max_blocks)
    try:
        with warnings.catch_warnings():
            # Small batches give small grids, and numba-cuda warns below 128 blocks; the grid is
            # one block per row by design, so the warning is noise (and an error under -W error).
            warnings.filterwarnings("ignore", message="Grid size .* under-utilization")
            kernel[grid, tpb](
                x, np.int64(inner), d_labels, np.int64(ignore_index), has_labels, out, write_rows,
                totals, np.int64(nrows),
            )
    except Exception as exc:
        _raise_if_unavailable(exc)
        raise
    return totals


def _raise_if_unavailable(exc: BaseException) -> None:
    """Turn a compile/driver failure into api.KernelUnavailable (auto falls back on it)."""
    from numba.core.errors import NumbaError

    from .errors import KernelUnavailable

    missing = ("CudaSupportError", "NvvmSupportError", "NvrtcSupportError", "DynamicLibNotFoundError")
    if isinstance(exc, NumbaError) or type(exc).__name__ in missing:
        raise KernelUnavailable(f"the cuda kernel could not be compiled or launched: {exc}") from exc


def _totals(d_totals) -> tuple[float, int]:
    total, count = d_totals.copy_to_host()
    return float(total), int(round(count))


# ------------------------------------------------------------------------------------------------
# host protocol
# ------------------------------------------------------------------------------------------------
def _host_to_device(x: np.ndarray):
    """Copy an encoded host batch to the GPU; returns ``(device array, encoding)``."""
    cuda = _numba_cuda()
    if x.dtype == np.int16:  # float16 bits: on the GPU they are read as real float16
        return cuda.to_device(x.view(np.float16)), "f16"
    if x.dtype == np.uint16:
        return cuda.to_device(x), "bf16"
    enc = _DEVICE_DTYPES.get(x.dtype)
    if enc is None:
        raise TypeError(f"unexpected host encoding {x.dtype}; expected float32, float64, uint16 or int16")
    return cuda.to_device(x), enc


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp of an encoded host batch, computed on the GPU.

    Parameters
    ----------
    x : ndarray, shape (N, V)
        float32, float64, uint16 (bfloat16 bits) or int16 (float16 bits), C-contiguous.

    Returns
    -------
    ndarray, shape (N,), float64
        Within 2e-5 of the float64 value relative to ``max(1, |exact|)`` (float32 accumulation for
        16/32-bit input; float64 input is accumulated in float64).
    """
    cuda = _numba_cuda()
    d_x, enc = _host_to_device(x)
    out = cuda.device_array(x.shape[0], dtype=np.float64)
    _run_rows(d_x, enc, x.shape[0], None, 0, out)
    return out.copy_to_host()


def cross_entropy_rows(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """Per-row cross entropy ``lse(z_i) - z_i[y_i]`` of an encoded host batch, on the GPU.

    Parameters
    ----------
    x : ndarray, shape (N, V)
        Encoded logits, as in :func:`logsumexp_rows`.
    labels : ndarray, shape (N,), int64
        In ``[0, V)`` or ``ignore_index`` (already checked by the caller).
    ignore_index : int

    Returns
    -------
    ndarray, shape (N,), float64
        0.0 on ignored rows.
    """
    cuda = _numba_cuda()
    d_x, enc = _host_to_device(x)
    out = cuda.device_array(x.shape[0], dtype=np.float64)
    _run_rows(d_x, enc, x.shape[0], cuda.to_device(labels), int(ignore_index), out)
    return out.copy_to_host()


def cross_entropy_sum(x: np.ndarray, labels: np.ndarray, ignore_index: int) -> tuple[float, int]:
    """Sum of per-row cross entropy over non-ignored rows, and their count.

    Same inputs as :func:`cross_entropy_rows`. The sum is accumulated on the GPU in float64 (one
    atomic add per block), so only two scalars come back; its last bits may vary between runs.
    """
    cuda = _numba_cuda()
    d_x, enc = _host_to_device(x)
    totals = _run_rows(d_x, enc, x.shape[0], cuda.to_device(labels), int(ignore_index), None)
    return _totals(totals)


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
    cuda = _numba_cuda()
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
    if _kernels().on_simulator() and type(obj).__name__ == "FakeCUDAArray":
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
    """Check labels on the host (same messages as host input); return them as int64 [N] on the GPU."""
    cuda = _numba_cuda()
    t = _torch_tensor(labels)
    if t is not None:
        host = t.detach().cpu()  # synchronous with respect to torch's stream
    elif _kernels().on_simulator() and type(labels).__name__ == "FakeCUDAArray":
        host = labels.copy_to_host()
    elif labels is not None and not isinstance(labels, np.ndarray) and hasattr(labels, "__cuda_array_interface__"):
        host = cuda.as_cuda_array(labels).copy_to_host()
    else:
        host = labels
    flat = as_host_labels(host, batch_shape, vocab, ignore_index)
    return cuda.to_device(flat)


def device_logsumexp(logits: Any):
    """Log-sum-exp over the last axis of GPU-resident logits.

    Parameters
    ----------
    logits : GPU array, shape (..., V)
        float16, bfloat16 (torch), float32 or float64.

    Returns
    -------
    numba device array, shape logits.shape[:-1]
        float64 for float64 logits, else float32.
    """
    cuda = _numba_cuda()
    arr, enc, batch_shape, _, out_dtype = _device_batch(logits)
    nrows = int(np.prod(batch_shape))
    out = cuda.device_array(nrows, dtype=out_dtype)
    _run_rows(arr, enc, nrows, None, 0, out)
    cuda.synchronize()
    return out.reshape(batch_shape)


def device_cross_entropy(logits: Any, labels: Any, ignore_index: int, reduction: str):
    """Cross entropy of GPU-resident logits.

    Parameters
    ----------
    logits : GPU array, shape (..., V)
    labels : int array (host or GPU), shape logits.shape[:-1]
    ignore_index : int
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    float or numba device array
        A Python float for "mean" (0.0 when no row is valid) and "sum"; for "none" a device array
        shaped like labels, float64 for float64 logits else float32, 0.0 on ignored rows.
    """
    cuda = _numba_cuda()
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    arr, enc, batch_shape, vocab, out_dtype = _device_batch(logits)
    d_labels = _device_labels(labels, batch_shape, vocab, ignore_index)
    nrows = int(np.prod(batch_shape))
    if reduction == "none":
        out = cuda.device_array(nrows, dtype=out_dtype)
        _run_rows(arr, enc, nrows, d_labels, ignore_index, out)
        cuda.synchronize()
        return out.reshape(batch_shape)
    total, count = _totals(_run_rows(arr, enc, nrows, d_labels, ignore_index, None))
    if reduction == "sum":
        return total
    return total / count if count else 0.0


def device_cross_entropy_sum(logits: Any, labels: Any, ignore_index: int) -> tuple[float, int]:
    """``(sum of CE over non-ignored rows, their count)`` for GPU-resident logits."""
    ignore_index = check_ignore_index(ignore_index)
    arr, enc, batch_shape, vocab, _ = _device_batch(logits)
    d_labels = _device_labels(labels, batch_shape, vocab, ignore_index)
    return _totals(_run_rows(arr, enc, int(np.prod(batch_shape)), d_labels, ignore_index, None))

