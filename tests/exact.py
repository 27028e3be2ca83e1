"""Float64 ground truth shared by the test modules, computed from the exact input values.

Every oracle here is NumPy/SciPy in float64 on the values the caller's (possibly narrow) array
holds, so a test compares a kernel with the exact answer to its own input. The error measure is
the contract's (:func:`ptx_numba.contract.rel_error`, relative to ``max(1, |exact|)``);
:func:`assert_close` applies it and names the worst element when it fails.
"""
import warnings

import ml_dtypes
import numpy as np
import scipy.special

from ptx_numba.contract import rel_error

__all__ = ["cast", "as_f64", "rel_error", "assert_close", "lse64", "ce64", "logp64", "entropy64",
           "kl64", "softmax64", "ce_grad64"]


def cast(z, dtype):
    """``z`` in the named dtype ("bfloat16" via ml_dtypes)."""
    return z.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def as_f64(x):
    """``x`` as a float64 array (a copy; NaN payloads of narrow types pass silently)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(x).astype(np.float64)


def assert_close(got, want, tol, what="", inputs=None):
    """Assert ``rel_error(got, want) <= tol`` on arrays of one shape.

    On failure the message names the worst element, its two values and, when ``inputs`` (the
    logits, last axis V) is given, the first entries of that element's row.
    """
    got, want = as_f64(got), as_f64(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = rel_error(got, want)
    if err <= tol:
        return
    flat_got, flat_want = got.reshape(-1), want.reshape(-1)
    k = max(range(flat_got.size), key=lambda j: rel_error(flat_got[j], flat_want[j]))
    i = tuple(int(a) for a in np.unravel_index(k, got.shape))
    detail = ""
    if inputs is not None:
        row = np.asarray(inputs).reshape(-1, np.shape(inputs)[-1])[k]
        detail = f"; row {i}: {row[:8]}..."
    raise AssertionError(f"{what}: rel err {err:.3g} > {tol:g} at {i}: got {float(flat_got[k])!r} "
                         f"want {float(flat_want[k])!r}{detail}")


def lse64(z):
    """scipy's float64 log-sum-exp over the last axis, special values silenced."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return scipy.special.logsumexp(as_f64(z), axis=-1)


def ce64(z, labels, ignore_index=-100):
    """Per-row float64 cross entropy over the last axis (shape of ``labels``); ignored rows 0.

    Finite rows use the cancellation-free ``log s - (z_y - m)`` with ``s = sum exp(z - m)``, so
    the oracle keeps its digits at ±3e4 offsets (``lse - z_y`` loses ~1e-12 there); rows with a
    special value take scipy's ``lse - z_y`` (NaN propagates, ``z_y = -inf`` gives ``+inf``).
    """
    z = as_f64(z)
    y = np.asarray(labels)
    ignored = y == ignore_index
    safe = np.where(ignored, 0, y)
    picked = np.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        m = np.max(z, axis=-1)
        shifted = np.log(np.sum(np.exp(z - m[..., None]), axis=-1)) - (picked - m)
        naive = lse64(z) - picked
    finite = np.isfinite(m) & np.isfinite(picked)
    return np.where(ignored, 0.0, np.where(finite, shifted, naive))


def logp64(z, temperature=1.0):
    """Float64 log-softmax of ``z / temperature`` over the last axis."""
    with np.errstate(all="ignore"):
        return scipy.special.log_softmax(as_f64(z) / temperature, axis=-1)


def softmax64(z, temperature=1.0):
    """Float64 softmax of ``z / temperature`` over the last axis."""
    with np.errstate(all="ignore"):
        return scipy.special.softmax(as_f64(z) / temperature, axis=-1)


def entropy64(z, temperature=1.0):
    """Float64 entropy ``-sum p log p`` of ``softmax(z / temperature)`` per row."""
    with np.errstate(all="ignore"):
        return scipy.special.entr(softmax64(z, temperature)).sum(axis=-1)


def kl64(z, w, temperature=1.0):
    """Float64 ``KL(softmax(z / T) || softmax(w / T))`` per row."""
    with np.errstate(all="ignore"):
        return scipy.special.rel_entr(softmax64(z, temperature), softmax64(w, temperature)).sum(axis=-1)


def ce_grad64(z, labels, ignore_index=-100):
    """Float64 gradient of the mean cross entropy over the last axis: ``(softmax - onehot) / count``
    on valid rows, 0 on ignored ones (shape of ``z``)."""
    z = as_f64(z)
    flat = z.reshape(-1, z.shape[-1])
    y = np.asarray(labels).reshape(-1)
    valid = y != ignore_index
    g = softmax64(flat)
    g[np.flatnonzero(valid), y[valid]] -= 1.0
    g[~valid] = 0.0
    return (g / max(1, int(valid.sum()))).reshape(z.shape)
