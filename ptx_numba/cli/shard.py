"""Scoring one shard (a logits ``.npy`` and its labels) block by block, and the result record.

A shard is walked in row blocks of about ``config.SCORE_BLOCK_BYTES`` through one open file
descriptor (:mod:`.npyfile`); each block goes to the public :func:`ptx_numba.cross_entropy` with the
backend resolved once for the whole run, and the shard's partial ``(sum, count)`` is formed in float64
exactly as the core forms a mean (no valid row -> 0).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .. import _dispatch, config
from .. import cross_entropy as _cross_entropy
from .._validate import check_label_range, labels_to_int64
from ..api import KernelUnavailable
from ._errors import CLIError
from .npyfile import NpyFile, logits_dtype

INT64 = np.iinfo(np.int64)


@dataclass(frozen=True)
class Settings:
    """Everything that changes a shard's partial sums (recorded in checkpoints)."""

    ignore_index: int = config.DEFAULT_IGNORE_INDEX
    backend: str = "reference"  # already resolved: never "auto"
    block_rows: int | None = None
    dtype: str | None = None  # --dtype
    op: str = "ce"  # "ce" or "logprobs" (what --per-row holds)
    per_row: bool = False

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


@dataclass(frozen=True)
class Shard:
    """A logits file and its labels file; ``name`` identifies it in messages and checkpoints."""

    name: str
    logits: str
    labels: str


def check_ignore_index(value: int) -> int:
    """``--ignore-index`` must fit the int64 labels it is compared with."""
    if not INT64.min <= value <= INT64.max:
        raise CLIError(f"--ignore-index {value} does not fit in int64")
    return value


def resolve_backend(name: str, nbytes: int = 0) -> str:
    """The backend that runs on host blocks of ``nbytes`` (``auto`` resolved as the API would)."""
    try:
        return _dispatch.resolve(name, on_device=False, nbytes=nbytes).name
    except (ValueError, TypeError, _dispatch.BackendUnavailableError) as exc:
        raise CLIError(str(exc)) from None


def flat_labels(labels: np.ndarray, batch_shape: tuple, vocab: int, ignore_index: int,
                order: str, where: str) -> np.ndarray:
    """Labels shaped like ``batch_shape`` (or flat, C order) as int64 rows walked in ``order``."""
    rows = math.prod(batch_shape)
    if labels.shape != batch_shape and labels.shape != (rows,):
        raise CLIError(f"{where}: labels shape {labels.shape} does not match logits shape "
                       f"{batch_shape + (vocab,)}: expected {batch_shape}"
                       + (f" or ({rows},)" if len(batch_shape) > 1 else ""))
    try:
        flat = labels_to_int64(labels.reshape(batch_shape)).ravel(order=order)
        check_label_range(flat, labels.shape, vocab, ignore_index)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{where}: {exc}") from None
    return np.ascontiguousarray(flat)


def inspect(shard: Shard, settings: Settings) -> dict:
    """Check a shard's headers (no data read): ``rows``, ``vocab``, ``dtype``, ``size``, ``mtime_ns``."""
    if not isinstance(shard, Shard):
        from . import zarrstore

        return zarrstore.inspect(shard, settings)
    with NpyFile(shard.logits, "logits") as lf, NpyFile(shard.labels, "labels") as yf:
        shape = lf.shape
        if len(shape) < 2:
            raise CLIError(f"logits in {shard.logits} must have shape [..., V] (at least 2 dimensions), "
                           f"got {shape}")
        if shape[-1] == 0:
            raise CLIError(f"logits in {shard.logits} have an empty vocabulary (V == 0), shape {shape}")
        dtype = logits_dtype(lf.dtype, shard.logits, settings.dtype)
        rows = math.prod(shape[:-1])
        if yf.shape != shape[:-1] and yf.shape != (rows,):
            raise CLIError(f"{shard.name}: labels shape {yf.shape} does not match logits shape {shape}: "
                           f"expected {shape[:-1]}" + (f" or ({rows},)" if len(shape) > 2 else ""))
        return {"rows": rows, "vocab": shape[-1], "dtype": str(dtype), "batch_shape": shape[:-1],
                "size": [lf.size, yf.size], "mtime_ns": [lf.mtime_ns, yf.mtime_ns]}


def default_block_rows(vocab: int, itemsize: int) -> int:
    """Rows per block: about ``config.SCORE_BLOCK_BYTES`` of logits."""
    return max(1, config.SCORE_BLOCK_BYTES // (vocab * itemsize))


def score_shard(shard: Shard, settings: Settings, on_rows=None) -> dict:
    """Score one shard; returns its partial record.

    Parameters
    ----------
    shard : Shard or ZarrShard
    settings : Settings
    on_rows : callable, optional
        Called with the number of rows of each block once it is scored (progress).

    Returns
    -------
    dict
        ``sum`` (float64 sum of CE over valid rows), ``count`` (valid rows), ``rows``, ``blocks``,
        ``size`` and ``mtime_ns`` (``[logits, labels]``, of the files as opened), and ``per_row`` (an
        ndarray in C order of the rows, CE or log-probs; ignored rows 0) when ``settings.per_row``.
    """
    if not isinstance(shard, Shard):
        from . import zarrstore

        return zarrstore.score_shard(shard, settings, on_rows)
    with NpyFile(shard.logits, "logits") as lf, NpyFile(shard.labels, "labels") as yf:
        if len(lf.shape) < 2 or lf.shape[-1] == 0:
            raise CLIError(f"logits in {shard.logits} must have shape [..., V] with V > 0, got {lf.shape}")
        dtype = logits_dtype(lf.dtype, shard.logits, settings.dtype)
        batch_shape, vocab = lf.shape[:-1], lf.shape[-1]
        labels = flat_labels(yf.read_all(), batch_shape, vocab, settings.ignore_index, lf.row_order,
                             shard.name)
        read = lf.rows(dtype)
        record = _score_blocks(read, labels, vocab, dtype, settings, on_rows)
        record.update(size=[lf.size, yf.size], mtime_ns=[lf.mtime_ns, yf.mtime_ns])
    if "per_row" in record and lf.row_order == "F":  # rows were walked in Fortran order of the batch
        record["per_row"] = record["per_row"].reshape(batch_shape, order="F").ravel(order="C")
    return record


def score_arrays(logits: np.ndarray, labels: np.ndarray, settings: Settings, where: str, on_rows=None) -> dict:
    """Score in-memory ``[rows, V]`` logits with flat labels in blocks (a Zarr chunk)."""
    vocab = logits.shape[-1]
    flat = flat_labels(labels, (logits.shape[0],), vocab, settings.ignore_index, "C", where)
    return _score_blocks(lambda a, b, fn: fn(logits[a:b]), flat, vocab, logits.dtype, settings, on_rows)


def _score_blocks(read, labels, vocab, dtype, settings: Settings, on_rows) -> dict:
    rows = labels.shape[0]
    block_rows = settings.block_rows or default_block_rows(vocab, dtype.itemsize)
    per_row = np.zeros(rows, np.float64 if dtype == np.float64 else np.float32) if settings.per_row else None
    total, blocks = 0.0, 0
    for first in range(0, rows, block_rows):
        last = min(first + block_rows, rows)
        y = labels[first:last]
        if per_row is not None:
            values = read(first, last, lambda x: _cross_entropy(
                x, y, ignore_index=settings.ignore_index, reduction="none", backend=settings.backend))
            per_row[first:last] = values
            total += float(np.sum(values, dtype=np.float64))
        else:
            total += read(first, last, lambda x: _cross_entropy(
                x, y, ignore_index=settings.ignore_index, reduction="sum", backend=settings.backend))
        blocks += 1
        if on_rows is not None:
            on_rows(last - first)
    record = {"sum": total, "count": int(np.count_nonzero(labels != settings.ignore_index)),
              "rows": rows, "blocks": blocks}
    if per_row is not None:
        if settings.op == "logprobs":
            per_row = np.negative(per_row) + 0.0  # + 0.0: ignored rows give 0.0, not -0.0
        record["per_row"] = per_row
    return record


def score_shard_safely(shard: Shard, settings: Settings) -> dict:
    """:func:`score_shard` for a worker process: errors come back as one line naming the shard."""
    try:
        return score_shard(shard, settings)
    except CLIError:
        raise
    except (ValueError, TypeError, OSError, MemoryError, KernelUnavailable) as exc:
        raise CLIError(f"{shard.name}: {type(exc).__name__}: {exc}") from None


def json_ready(result: dict) -> dict:
    """``result`` with every non-finite float replaced by None, plus ``finite``.

    JSON has no NaN or Infinity (``JSON.parse`` rejects them), so a non-finite loss is written as
    ``null`` and ``"finite": false`` says so.
    """
    finite = True
    out = {}
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            finite, value = False, None
        out[key] = value
    out["finite"] = finite
    return out


def shard_name(path: str) -> str:
    """The name of a single-file shard: its file name."""
    return os.path.basename(path)
