"""``ptx-numba score``: one ``.npy`` pair or a dataset of shards, locally or on Dask.

Shards are checked up front (headers only: shapes, dtypes, one V for all), then scored one by one
(or as Dask tasks, one per shard), each recorded in the checkpoint as it finishes. The result combines
the shards' float64 partial sums in shard order, whatever order they finished in.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import numpy as np
from numpy.lib.format import open_memmap

from ._errors import CLIError
from .checkpoint import Checkpoint
from .shard import (Settings, Shard, default_block_rows, inspect, resolve_backend, score_shard,
                    score_shard_safely, shard_name)
from . import zarrstore
from .shards import discover, is_dataset

#: Seconds to wait for a Dask scheduler before giving up (``--scheduler-timeout``).
DEFAULT_SCHEDULER_TIMEOUT = 10.0


def _progress(total: int, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="scoring", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=True)


def _check_scalars(beta, rl_loss):
    if rl_loss is not None and beta is None:
        raise CLIError("--rl-loss needs --beta (the weight of the pre-training term)")
    for name, value in (("--beta", beta), ("--rl-loss", rl_loss)):
        if value is not None and not math.isfinite(value):
            raise CLIError(f"{name} must be finite, got {value}")
    return beta, (0.0 if rl_loss is None and beta is not None else rl_loss)


def _per_row_file(path: str, rows: int, dtype, resume: bool):
    """The ``--per-row`` output (a ``.npy`` memory map); reused when resuming into the same shape."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError(f"--per-row: directory {directory} does not exist")
    if resume and os.path.isfile(path):
        try:
            out = open_memmap(path, mode="r+")
            if out.shape == (rows,) and out.dtype == dtype:
                return out, True
            del out
        except (ValueError, OSError):
            pass
    try:
        return open_memmap(path, mode="w+", dtype=dtype, shape=(rows,)), False
    except (ValueError, OSError) as exc:
        raise CLIError(f"cannot write --per-row file {path}: {exc}") from None


def _client(scheduler: str | None, workers: int | None, timeout: float):
    """A ``distributed.Client`` for ``--scheduler`` or a local cluster of ``--workers`` processes."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CLIError("--scheduler/--workers need Dask: pip install 'ptx_numba[dask]'") from None
    if scheduler:
        try:
            return Client(scheduler, timeout=timeout), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise CLIError(f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s: "
                           f"{type(exc).__name__}: {exc}") from None
    # One Numba thread per worker slot: the workers share the cores.
    threads = max(1, (os.cpu_count() or 1) // workers)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0", env={"NUMBA_NUM_THREADS": str(threads)})
    return Client(cluster), cluster


def score(source: str, labels: str | None = None, *, beta: float | None = None,
          rl_loss: float | None = None, ignore_index: int = -100, backend: str = "auto",
          block_rows: int | None = None, dtype: str | None = None, op: str = "ce",
          per_row: str | None = None, checkpoint: str | None = None, progress: bool | None = None,
          scheduler: str | None = None, workers: int | None = None,
          scheduler_timeout: float = DEFAULT_SCHEDULER_TIMEOUT) -> dict:
    """Score a ``.npy`` pair or a dataset of shards; returns the JSON-ready result.

    Parameters
    ----------
    source : str
        A logits ``.npy`` (then ``labels`` names its labels), or a directory / glob of shards
        (see :mod:`ptx_numba.cli.shards`).
    labels : str, optional
    beta, rl_loss : float, optional
        With ``beta``, the result has ``total = rl_loss + beta * ce`` and ``ptx`` (rl_loss default 0).
    ignore_index, backend, block_rows, dtype, op, per_row, checkpoint, progress, scheduler, workers,
    scheduler_timeout
        As the command-line options of the same names.

    Returns
    -------
    dict
        ``ce`` (mean CE over valid rows, 0 without any), ``tokens`` (= ``valid_rows``), ``rows``,
        ``shards``, ``shards_scored`` (not taken from the checkpoint), ``blocks``, ``backend`` (the
        one that ran), ``seconds`` and ``gbps`` (scoring only), ``startup_seconds`` (connecting to
        Dask or starting its workers), and
        ``total``/``ptx`` with ``beta``.
    """
    beta, rl_loss = _check_scalars(beta, rl_loss)
    if is_dataset(source):
        if labels is not None:
            kind = "is a directory" if os.path.isdir(source) else "is a glob"
            raise CLIError(f"{source} {kind} (a dataset of shards); give no labels file beside it")
        shards = zarrstore.discover(source) if zarrstore.is_zarr_store(source) else discover(source)
    else:
        if labels is None:
            raise CLIError(f"{source} is a single logits file: give its labels file too")
        shards = [Shard(name=shard_name(source), logits=source, labels=labels)]
    resolve_backend(backend)  # an unknown or unavailable backend fails before any file is read
    settings = Settings(ignore_index=ignore_index, backend="reference", block_rows=block_rows,
                        dtype=dtype, op=op, per_row=per_row is not None)
    infos = [inspect(s, settings) for s in shards]
    vocab = infos[0]["vocab"]
    for shard, info in zip(shards, infos):
        if info["vocab"] != vocab:
            raise CLIError(f"shard {shard.name} has V={info['vocab']}, but {shards[0].name} has V={vocab}")
    # auto is resolved once, as the API would resolve it for the run's largest block
    itemsize = max(np.dtype(_itemsize_dtype(i)).itemsize for i in infos)
    block = (block_rows or default_block_rows(vocab, itemsize)) * vocab * itemsize
    largest = min(block, max(i["rows"] for i in infos) * vocab * itemsize)
    settings = dataclasses.replace(settings, backend=resolve_backend(backend, nbytes=largest))
    ckpt = None
    if checkpoint:
        dataset = {"source": os.path.abspath(source), "shards": [s.name for s in shards], "vocab": vocab}
        ckpt = Checkpoint(checkpoint, dataset, settings.as_dict())
    total_rows = sum(i["rows"] for i in infos)
    offsets = np.cumsum([0] + [i["rows"] for i in infos]).tolist()
    per_row_out, reused = None, False
    if per_row:
        out_dtype = np.float64 if all(i["dtype"] == "float64" for i in infos) else np.float32
        per_row_out, reused = _per_row_file(per_row, total_rows, out_dtype, resume=ckpt is not None)
    partials: dict[int, dict] = {}
    if ckpt is not None and (per_row_out is None or reused):
        for k, (shard, info) in enumerate(zip(shards, infos)):
            done = ckpt.finished(shard.name, info["size"], info["mtime_ns"])
            if done is not None:
                partials[k] = done
    pending = [k for k in range(len(shards)) if k not in partials]

    def finish(k: int, partial: dict) -> None:
        if per_row_out is not None:
            per_row_out[offsets[k]:offsets[k + 1]] = partial.pop("per_row")
            per_row_out.flush()
        partials[k] = partial
        if ckpt is not None:
            ckpt.record(shards[k].name, partial)

    if progress is None:
        progress = sys.stderr.isatty()
    start, startup = time.perf_counter(), 0.0
    if scheduler or workers:
        startup = _run_on_dask(shards, pending, settings, finish, progress, scheduler, workers, scheduler_timeout)
        start += startup
    else:
        with _progress(sum(infos[k]["rows"] for k in pending), progress, "rows") as bar:
            for k in pending:
                finish(k, score_shard(shards[k], settings, on_rows=bar.update))
    seconds = time.perf_counter() - start
    if per_row_out is not None:
        del per_row_out

    ce_sum = 0.0
    for k in range(len(shards)):  # shard order: the same result however the run was split
        ce_sum += partials[k]["sum"]
    count = sum(partials[k]["count"] for k in range(len(shards)))
    ce = ce_sum / count if count else 0.0  # as the core: no valid row -> 0
    scored_bytes = sum(infos[k]["rows"] * vocab * np.dtype(_itemsize_dtype(infos[k])).itemsize
                       for k in pending)
    result = {"ce": ce, "tokens": count, "valid_rows": count, "rows": total_rows, "shards": len(shards),
              "shards_scored": len(pending), "blocks": sum(p["blocks"] for p in partials.values()),
              "backend": settings.backend, "seconds": seconds, "startup_seconds": startup,
              "gbps": scored_bytes / seconds / 1e9 if seconds > 0 and pending else None}
    if beta is not None:
        result.update(total=rl_loss + beta * ce, ptx=beta * ce)
    return result


def _itemsize_dtype(info: dict):
    return np.uint16 if info["dtype"] == "bfloat16" else np.dtype(info["dtype"])


def _run_on_dask(shards, pending, settings, finish, progress, scheduler, workers, timeout) -> float:
    """Score the pending shards as Dask tasks; returns the seconds spent connecting / starting workers."""
    start = time.perf_counter()
    client, cluster = _client(scheduler, workers, timeout)
    try:
        if workers:
            client.wait_for_workers(workers, timeout=max(timeout, 60.0))
        startup = time.perf_counter() - start
        from distributed import as_completed

        futures = {client.submit(score_shard_safely, shards[k], settings, key=f"ptx-numba-shard-{k}-"
                                 f"{os.getpid()}-{time.time_ns()}", pure=False): k for k in pending}
        with _progress(len(pending), progress, "shards") as bar:
            for future in as_completed(futures):
                k = futures[future]
                try:
                    partial = future.result()
                except CLIError:
                    for other in futures:
                        other.cancel()
                    raise
                except Exception as exc:  # a worker died or an unexpected error
                    for other in futures:
                        other.cancel()
                    raise CLIError(f"{shards[k].name}: {type(exc).__name__}: {exc}") from None
                finish(k, partial)
                bar.update(1)
        return startup
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
