"""Zarr stores as datasets: a group with a ``logits`` array ``[..., V]`` and a ``labels`` array
shaped like ``logits.shape[:-1]``; each chunk of rows (along the first axis) is one shard.

A shard is read one row chunk at a time (decompressed into memory: one chunk, never the array) and
scored in blocks. Changes are detected for the store as a whole (the total size and latest mtime of
the files under ``logits/`` and ``labels/``): with ``--checkpoint``, any change rescores every shard.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ._errors import CLIError
from .npyfile import logits_dtype

_MARKERS = ("zarr.json", ".zgroup")  # a v3 node or a v2 group


@dataclass(frozen=True)
class ZarrShard:
    """Rows ``[start, stop)`` (first axis) of the store at ``store``."""

    name: str
    store: str
    start: int
    stop: int


def is_zarr_store(path: str) -> bool:
    """True for a directory that is a Zarr (v2 or v3) group."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _MARKERS)


def _open(store: str):
    try:
        import zarr
    except ImportError:
        raise CLIError(f"{store} is a Zarr store: reading it needs zarr (pip install zarr)") from None
    try:
        group = zarr.open_group(store, mode="r")
        return group["logits"], group["labels"]
    except KeyError as exc:
        raise CLIError(f"Zarr store {store} needs arrays 'logits' and 'labels' (missing {exc})") from None
    except Exception as exc:  # corrupt metadata raises many kinds of errors
        raise CLIError(f"cannot open Zarr store {store}: {type(exc).__name__}: {exc}") from None


def _fingerprint(store: str) -> tuple[list, list]:
    size, mtime = 0, 0
    for sub in ("logits", "labels"):
        for root, _, files in os.walk(os.path.join(store, sub)):
            for f in files:
                st = os.stat(os.path.join(root, f))
                size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return [size], [mtime]


def discover(store: str) -> list[ZarrShard]:
    """One shard per chunk of rows of ``logits``."""
    logits, labels = _open(store)
    if logits.ndim < 2 or logits.shape[-1] == 0:
        raise CLIError(f"logits in {store} must have shape [..., V] with V > 0, got {logits.shape}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise CLIError(f"labels in {store} have shape {labels.shape}, expected {logits.shape[:-1]}")
    step = logits.chunks[0]
    n = logits.shape[0]
    shards = [ZarrShard(f"rows {a}:{min(a + step, n)}", store, a, min(a + step, n)) for a in range(0, n, step)]
    if not shards:
        shards = [ZarrShard("rows 0:0", store, 0, 0)]
    return shards


def inspect(shard: ZarrShard, settings) -> dict:
    """As :func:`ptx_numba.cli.shard.inspect`, for a Zarr row chunk."""
    logits, _ = _open(shard.store)
    dtype = logits_dtype(np.dtype(logits.dtype), shard.store, settings.dtype)
    size, mtime = _fingerprint(shard.store)
    rows = (shard.stop - shard.start) * math.prod(logits.shape[1:-1])
    return {"rows": rows, "vocab": logits.shape[-1], "dtype": str(dtype), "size": size, "mtime_ns": mtime}


def score_shard(shard: ZarrShard, settings, on_rows=None) -> dict:
    """Score one row chunk of a Zarr store (see :func:`ptx_numba.cli.shard.score_shard`)."""
    from .shard import score_arrays

    logits, labels = _open(shard.store)
    dtype = logits_dtype(np.dtype(logits.dtype), shard.store, settings.dtype)
    size, mtime = _fingerprint(shard.store)
    try:
        x = np.asarray(logits[shard.start:shard.stop])
        y = np.asarray(labels[shard.start:shard.stop])
    except Exception as exc:
        raise CLIError(f"{shard.store} {shard.name}: cannot read: {type(exc).__name__}: {exc}") from None
    x = x.reshape(-1, x.shape[-1]).view(dtype) if x.dtype != dtype else x.reshape(-1, x.shape[-1])
    record = score_arrays(x, y.reshape(-1), settings, f"{shard.store} {shard.name}", on_rows)
    record.update(size=size, mtime_ns=mtime)
    return record
