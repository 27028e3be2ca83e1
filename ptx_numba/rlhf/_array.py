"""One array namespace for NumPy arrays and torch tensors, so each formula is written once.

Every public function in :mod:`ptx_numba.rlhf` calls :func:`prepare` on its array arguments and
computes with the returned namespace ``xp`` (from ``array-api-compat``):

* No argument is a torch tensor: everything becomes a float64 NumPy array and results are float64
  (NumPy scalars for 0-d results).
* Some argument is a torch tensor: every argument becomes a tensor on that tensor's device, and
  the formula is evaluated in float64 (these are ``[batch, tokens]``-sized arrays, a few MB at
  most, so the upcast costs little next to the logits that produced them). The result is cast
  back to the promoted floating dtype of the tensor arguments (the default dtype when none is
  floating), so ``float32``/``bfloat16`` in gives the same dtype out, and autograd flows through
  both casts. torch is never imported here: ``array_api_compat`` detects tensors through
  ``sys.modules``, so the package imports without torch.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace, is_torch_array

REDUCTIONS = ("mean", "sum", "none")


class Prepared(NamedTuple):
    """The namespace, the converted arrays and the dtype the result is cast back to."""

    xp: Any
    arrays: tuple
    out_dtype: Any  # a torch dtype, or None for NumPy (float64)


def _torch_of(values):
    for v in values:
        if is_torch_array(v):
            return v
    return None


def _check_numpy_dtype(name: str, a: np.ndarray, allow_bool: bool) -> None:
    kinds = "biuf" if allow_bool else "iuf"
    if a.dtype.kind not in kinds:
        what = "bool" if a.dtype.kind == "b" else str(a.dtype)
        raise TypeError(f"{name} must hold real numbers, got dtype {what}")


def _to_numpy(name: str, v, allow_bool: bool = False) -> np.ndarray:
    if v is None:
        raise TypeError(f"{name} must be an array or a number, got None")
    try:
        a = np.asarray(v)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name} is ragged or not array-like: {exc}") from None
    if a.dtype == object:
        raise ValueError(f"{name} is ragged or holds non-numbers (object array)")
    _check_numpy_dtype(name, a, allow_bool)
    return a


def prepare(named: dict, masks: dict | None = None) -> Prepared:
    """Convert the value arrays in ``named`` (float64) and the masks in ``masks`` (bool).

    Returns the arrays in the order given, values first, then masks. Masks treat any nonzero
    entry as valid. ``None`` masks stay ``None``.
    """
    masks = masks or {}
    present = list(named.values()) + [m for m in masks.values() if m is not None]
    ref = _torch_of(present)
    out = []
    if ref is None:
        for name, v in named.items():
            out.append(_to_numpy(name, v).astype(np.float64, copy=False))
        for name, m in masks.items():
            out.append(None if m is None else _to_numpy(name, m, allow_bool=True) != 0)
        xp = array_namespace(np.empty(0))
        return Prepared(xp, tuple(out), None)

    import torch  # present: some argument is a tensor

    device = ref.device
    floats = []
    for name, v in list(named.items()) + [(n, m) for n, m in masks.items() if m is not None]:
        if is_torch_array(v):
            if v.device != device:
                raise ValueError(f"{name} is on {v.device} but other inputs are on {device}")
            if v.is_complex():
                raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    for name, v in named.items():
        if is_torch_array(v):
            if v.dtype == torch.bool:
                raise TypeError(f"{name} must hold real numbers, got dtype torch.bool")
            if v.is_floating_point():
                floats.append(v.dtype)
            out.append(v.to(torch.float64))
        else:
            # a copy: torch warns about (and must not alias) read-only or foreign buffers
            a = np.array(_to_numpy(name, v), dtype=np.float64, copy=True)
            out.append(torch.as_tensor(a, device=device))
    for name, m in masks.items():
        if m is None:
            out.append(None)
        elif is_torch_array(m):
            out.append(m != 0)
        else:
            out.append(torch.as_tensor(_to_numpy(name, m, allow_bool=True) != 0, device=device))
    out_dtype = torch.get_default_dtype()
    if floats:
        out_dtype = floats[0]
        for d in floats[1:]:
            out_dtype = torch.promote_types(out_dtype, d)
    return Prepared(array_namespace(ref), tuple(out), out_dtype)


def finish(p: Prepared, result):
    """Cast a result back (torch) or unwrap a 0-d array into a NumPy float64 scalar."""
    if p.out_dtype is not None:
        return result.to(p.out_dtype)
    return result[()] if result.ndim == 0 else result


def broadcast_shape(named: dict) -> tuple:
    """The common broadcast shape of the named arrays, or a ValueError naming their shapes."""
    shapes = {k: tuple(v.shape) for k, v in named.items() if v is not None}
    try:
        return tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"shapes do not broadcast: {listed}") from None


def softplus(xp, x):
    """log(1 + exp(x)) without overflow: logaddexp(0, x). -log sigmoid(z) is softplus(-z)."""
    return xp.logaddexp(xp.zeros_like(x), x)


def masked(xp, x, mask):
    """x where mask holds, else 0 (never x*mask: inf*0 is NaN, and so is its gradient)."""
    return x if mask is None else xp.where(mask, x, xp.zeros_like(x))


def size(x) -> int:
    return math.prod(tuple(x.shape))


def reduce(xp, x, reduction: str):
    """``"none"``: x; ``"sum"``: the sum; ``"mean"``: the mean, 0.0 for an empty x (not NaN)."""
    if reduction == "none":
        return x
    total = xp.sum(x)
    if reduction == "sum":
        return total
    return total / max(size(x), 1)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def real(name: str, v, *, min_value=None, strict_min=False, finite=True) -> float:
    """A real scalar parameter as a Python float, with a clear TypeError/ValueError."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    f = float(v)
    if math.isnan(f) or (finite and math.isinf(f)):
        raise ValueError(f"{name} must be finite, got {f}")
    if min_value is not None:
        if strict_min and not f > min_value:
            raise ValueError(f"{name} must be > {min_value}, got {f}")
        if not strict_min and not f >= min_value:
            raise ValueError(f"{name} must be >= {min_value}, got {f}")
    return f
