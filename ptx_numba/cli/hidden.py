"""``ptx-numba score --hidden H.npy --weight W.npy LABELS.npy``: score hidden states through the
LM head without the ``[N, V]`` logits (:func:`ptx_numba.linear_cross_entropy`, row block by row
block of the memory-mapped hidden states)."""
from __future__ import annotations

import math
import os
import time

import numpy as np

from .. import _dispatch, config, contract
from ..linear import linear_cross_entropy
from ._errors import CLIError
from .run import _check_scalars


def _load(path: str, what: str, mmap: bool) -> np.ndarray:
    if not os.path.isfile(path):
        raise CLIError(f"{what} file not found (or not a regular file): {path}")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, OverflowError) as exc:
        raise CLIError(f"cannot read {what} file {path} as a .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fV":
        raise CLIError(f"{what} in {path} must be floating point, got dtype {getattr(arr, 'dtype', '?')}")
    return arr


def score_hidden(hidden_path: str, weight_path: str, labels_path: str, *, bias_path: str | None = None,
                 beta: float | None = None, rl_loss: float | None = None,
                 ignore_index: int = config.DEFAULT_IGNORE_INDEX, backend: str = "auto",
                 block_rows: int | None = None) -> dict:
    """Mean CE of ``hidden @ weight.T (+ bias)`` against labels; the JSON-ready result.

    Parameters
    ----------
    hidden_path, weight_path, labels_path : str
        ``[..., D]`` hidden states (memory-mapped), the ``[V, D]`` LM head, labels shaped like
        ``hidden.shape[:-1]`` (or flat).
    bias_path : str, optional
        ``[V]`` bias.
    beta, rl_loss, ignore_index, backend, block_rows
        As for the logits form of ``score``.
    """
    beta, rl_loss = _check_scalars(beta, rl_loss)
    start = time.perf_counter()
    try:
        name = _dispatch.resolve(backend).name
    except (ValueError, TypeError, _dispatch.BackendUnavailableError) as exc:
        raise CLIError(str(exc)) from None
    hidden = _load(hidden_path, "hidden", mmap=True)
    weight = _load(weight_path, "weight", mmap=False)
    bias = None if bias_path is None else _load(bias_path, "bias", mmap=False)
    labels = np.load(labels_path, allow_pickle=False) if os.path.isfile(labels_path) else None
    if labels is None:
        raise CLIError(f"labels file not found (or not a regular file): {labels_path}")
    if hidden.ndim < 2:
        raise CLIError(f"hidden in {hidden_path} must be [..., D] with at least 2 dimensions, got {hidden.shape}")
    h = hidden.reshape(-1, hidden.shape[-1])
    rows = h.shape[0]
    if labels.size != rows:
        raise CLIError(f"labels in {labels_path} have {labels.size} entries for {rows} rows of hidden states")
    y = labels.reshape(-1)
    vocab = weight.shape[0] if weight.ndim == 2 else 0
    if block_rows is None:
        block_rows = max(1, config.SCORE_BLOCK_BYTES // max(1, 4 * max(vocab, hidden.shape[-1])))
    partials = []
    try:
        for first in range(0, rows, block_rows):
            last = min(first + block_rows, rows)
            total = linear_cross_entropy(np.asarray(h[first:last]), weight, y[first:last], bias=bias,
                                         ignore_index=ignore_index, reduction="sum", backend=name)
            partials.append((total, int(np.count_nonzero(y[first:last] != ignore_index))))
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    ce_sum, valid = contract.combine(partials)
    ce = contract.mean_of(ce_sum, valid)
    result = {"ce": ce, "tokens": valid, "rows": rows, "valid_rows": valid,
              "blocks": math.ceil(rows / block_rows) if rows else 0, "shards": 1, "backend": name,
              "seconds": time.perf_counter() - start}
    if beta is not None:
        result["ptx"] = beta * ce
        result["total"] = rl_loss + beta * ce
    return result
