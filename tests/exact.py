"""Float64 ground truth shared by the test modules, computed from the exact input values."""
import warnings

import ml_dtypes
import numpy as np
import scipy.special


def cast(z, dtype):
    """``z`` in the named dtype ("bfloat16" via ml_dtypes)."""
    return z.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def as_f64(x):
    with np.errstate(invalid="ignore"):
        return np.asarray(x).astype(np.float64)


def lse64(z):
    """scipy's float64 log-sum-exp over the last axis, special values silenced."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return scipy.special.logsumexp(as_f64(z), axis=-1)


def ce64(z, labels, ignore_index=-100):
    """Per-row float64 cross entropy; ignored rows 0."""
    z = as_f64(z)
    y = np.asarray(labels)
    safe = np.where(y == ignore_index, 0, y)
    picked = np.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):
        return np.where(y == ignore_index, 0.0, lse64(z) - picked)
