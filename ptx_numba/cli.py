"""Command line: ``ptx-numba score`` (PTX loss of .npy files) and ``ptx-numba bench``.

``score`` memory-maps the logits and walks them in row blocks of about
``config.SCORE_BLOCK_BYTES``, so a file larger than RAM is scored in bounded memory; the result is
``ptx_loss`` on the whole array (the mean over valid rows is formed from per-block sums and counts).

Every user error ends as one line on stderr (``ptx-numba: error: ...``) and a non-zero exit status;
set ``PTX_NUMBA_DEBUG=1`` to see the traceback of an unexpected error instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from . import __version__, _bench, _bench_report, _dispatch, config
from ._validate import check_finite_scalar, check_label_range, labels_to_int64
from .api import KernelUnavailable, cross_entropy

PROG = "ptx-numba"
EXIT_USAGE = 2
EXIT_FAILURE = 1
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"  # .npz archives are zip files


class CLIError(Exception):
    """A problem with the user's input; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and does not exit by itself."""

    def error(self, message):
        raise CLIError(message)


# --------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    WIDTH = 30

    def __init__(self, total_rows: int, enabled: bool, stream=None):
        self.total = max(total_rows, 1)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, done_rows: int, done_bytes: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.1 and done_rows < self.total):
            return
        self.last_draw = now
        frac = done_rows / self.total
        bar = "#" * int(frac * self.WIDTH)
        rate = done_bytes / max(now - self.start, 1e-9) / 1e9
        self.stream.write(
            f"\rscoring [{bar:<{self.WIDTH}}] {frac:6.1%}  {done_rows}/{self.total} rows  {rate:.2f} GB/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _load_npy(path: str, what: str, mmap: bool) -> np.ndarray:
    """``np.load`` with every failure turned into one readable line."""
    if not os.path.exists(path):
        raise CLIError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"{what} path is a directory, expected a .npy file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise CLIError(f"cannot open {what} file {path}: {exc.strerror or exc}") from None
    if magic.startswith(ZIP_MAGIC):
        raise CLIError(f"{what} file {path} is an .npz archive; expected a single-array .npy file")
    if magic != NPY_MAGIC:  # np.load would guess "pickle" and say something confusing
        raise CLIError(f"{what} file {path} is not a .npy file (no NumPy header)")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CLIError(f"cannot read {what} file {path} as a .npy array: {exc}") from None
    return arr


def _logits_view(arr: np.ndarray, path: str) -> np.ndarray:
    """The memory-mapped logits as ``[rows, V]`` in a dtype the API understands, without a copy."""
    if arr.ndim < 2:
        raise CLIError(f"logits in {path} must have shape [..., V] (at least 2 dimensions), got {arr.shape}")
    if arr.shape[-1] == 0:
        raise CLIError(f"logits in {path} have an empty vocabulary (V == 0), shape {arr.shape}")
    if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:
        # np.save writes ml_dtypes.bfloat16 arrays as opaque 2-byte records; reinterpret them.
        try:
            import ml_dtypes
        except ImportError:
            raise CLIError(f"{path} holds 2-byte opaque values (bfloat16 as saved by ml_dtypes); "
                           "reading them needs ml_dtypes") from None
        arr = arr.view(ml_dtypes.bfloat16)
    elif arr.dtype.kind not in "fiu":
        raise CLIError(f"logits in {path} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim > 2 and not arr.flags.c_contiguous:
        # Flattening a Fortran-ordered [B, T, V] array would copy the whole file into memory.
        raise CLIError(f"logits in {path} are stored in Fortran order; re-save them in C order to stream")
    return arr.reshape(-1, arr.shape[-1]) if arr.ndim > 2 else arr


def _row_block_reader(raw: np.ndarray, logits: np.ndarray, path: str):
    """A function ``read(first, last)`` returning rows ``[first, last)`` of the logits.

    A C-ordered file gets a fresh mapping per block, dropped once the block is scored: pages read
    through one file-wide mapping would stay counted in the process's resident memory (until the
    kernel reclaims them) and make a 100 GB file look like a 100 GB process.
    """
    if not (isinstance(raw, np.memmap) and raw.flags.c_contiguous):
        return lambda first, last: logits[first:last]  # Fortran order: rows are strided anyway
    vocab = logits.shape[1]
    row_bytes = vocab * logits.itemsize

    def read(first: int, last: int) -> np.ndarray:
        return np.memmap(path, dtype=logits.dtype, mode="r", offset=raw.offset + first * row_bytes,
                         shape=(last - first, vocab))

    return read


def _flat_labels(labels: np.ndarray, batch_shape: tuple, vocab: int, ignore_index: int) -> np.ndarray:
    """Labels shaped like ``logits.shape[:-1]`` (or already flat), checked, as int64 ``[rows]``."""
    rows = math.prod(batch_shape)
    if labels.shape != batch_shape and labels.shape != (rows,):
        raise CLIError(f"labels shape {labels.shape} does not match logits shape {batch_shape + (vocab,)}: "
                       f"expected {batch_shape}" + (f" or ({rows},)" if len(batch_shape) > 1 else ""))
    try:
        flat = labels_to_int64(labels)
        check_label_range(flat.reshape(-1), labels.shape, vocab, ignore_index)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    return flat.reshape(-1)


def _check_backend(name: str) -> None:
    """Refuse an unknown or unavailable backend before reading any data."""
    try:
        resolved = _dispatch.requested_backend(name)
        if resolved != "auto":
            _dispatch.explicit(resolved)
    except (ValueError, _dispatch.BackendUnavailableError) as exc:
        raise CLIError(str(exc)) from None


def score_file(
    logits_path: str,
    labels_path: str,
    *,
    beta: float,
    rl_loss: float,
    ignore_index: int = config.DEFAULT_IGNORE_INDEX,
    backend: str = "auto",
    block_rows: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Score ``.npy`` files block by block; returns the result as a JSON-ready dict.

    Parameters
    ----------
    logits_path, labels_path : str
        ``[..., V]`` logits (memory-mapped, never loaded whole) and labels shaped like
        ``logits.shape[:-1]`` (or flat).
    beta, rl_loss : float
        As in :func:`ptx_numba.ptx_loss`.
    ignore_index : int
    backend : str
    block_rows : int, optional
        Rows per block; default ``config.SCORE_BLOCK_BYTES`` worth of logits.
    progress : bool or None
        Draw a progress bar on stderr; None (default): when stderr is a TTY and there are several
        blocks.

    Returns
    -------
    dict
        ``total``, ``ptx``, ``ce`` (as :func:`ptx_numba.ptx_loss`), ``rows``, ``valid_rows``,
        ``blocks``, ``backend``, ``seconds``.
    """
    try:
        beta = check_finite_scalar(beta, "--beta")
        rl_loss = check_finite_scalar(rl_loss, "--rl-loss")
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    _check_backend(backend)
    raw = _load_npy(logits_path, "logits", mmap=True)
    logits = _logits_view(raw, logits_path)
    rows, vocab = logits.shape
    labels = _flat_labels(_load_npy(labels_path, "labels", mmap=False), raw.shape[:-1], vocab, ignore_index)
    if block_rows is None:
        block_rows = max(1, config.SCORE_BLOCK_BYTES // (vocab * logits.itemsize))
    n_blocks = -(-rows // block_rows)

    start = time.perf_counter()
    if progress is None:
        progress = n_blocks > 1 and sys.stderr.isatty()
    bar = Progress(rows, enabled=progress)
    read_rows = _row_block_reader(raw, logits, logits_path)
    ce_sum, valid = 0.0, 0
    for first in range(0, rows, block_rows):
        last = min(first + block_rows, rows)
        block_labels = labels[first:last]
        ce_sum += cross_entropy(read_rows(first, last), block_labels, ignore_index=ignore_index,
                                reduction="sum", backend=backend)
        valid += int(np.count_nonzero(block_labels != ignore_index))
        bar.update(last, last * vocab * logits.itemsize)
    bar.close()
    ce = ce_sum / valid if valid else 0.0  # same convention as ptx_loss: no valid row -> 0
    ptx = beta * ce
    return {
        "total": rl_loss + ptx, "ptx": ptx, "ce": ce, "rows": rows, "valid_rows": valid,
        "blocks": n_blocks, "backend": backend, "seconds": time.perf_counter() - start,
    }


def _cmd_score(args) -> int:
    result = score_file(
        args.logits, args.labels, beta=args.beta, rl_loss=args.rl_loss, ignore_index=args.ignore_index,
        backend=args.backend, block_rows=args.block_rows, progress=True if args.progress else None,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"total  {result['total']!r}")
        print(f"ptx    {result['ptx']!r}")
        print(f"ce     {result['ce']!r}")
        print(f"rows   {result['rows']} ({result['valid_rows']} valid, {result['blocks']} blocks)")
    return 0


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _cmd_bench(args) -> int:
    try:
        dtypes = args.dtype or ["float32"]
        for name in dtypes:
            _bench.numpy_dtype(name)
        contenders = _bench.resolve_contenders(args.backends)
        threads = args.threads or [_default_threads()]
        _bench.check_threads(threads)
        if args.plot:
            _bench_report.require_matplotlib()
        machine = _bench.machine_description()
        records: list[dict] = []
        for dtype in dtypes:
            for vocab in args.vocab or [_bench.DEFAULT_VOCAB]:
                for rows in args.rows or [_bench.DEFAULT_ROWS]:
                    for k in threads:
                        case = _bench.Case(dtype, rows, vocab, k)
                        results = _bench.run_case(case, contenders, args.repeat, seed=args.seed)
                        nbytes = _bench.logits_nbytes(case)
                        print(_bench_report.format_table(case, results, nbytes, machine), end="\n\n", flush=True)
                        records += _bench_report.csv_records(case, results, nbytes, machine)
        if args.csv:
            records = _bench_report.update_csv(args.csv, records)
            print(f"wrote {args.csv}")
        if args.plot:
            _bench_report.plot_gbps(records, args.plot, machine)
            print(f"wrote {args.plot}")
    except _bench.BenchError as exc:
        raise CLIError(str(exc)) from None
    return 0


def _default_threads() -> int:
    import numba

    return numba.get_num_threads()


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fused cross entropy for the RLHF pre-training (PTX) loss.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{score,bench}", required=True, parser_class=_Parser)

    score = sub.add_parser("score", help="PTX loss of logits/labels .npy files (streamed in blocks)",
                           description="total = rl_loss + beta * mean CE over non-ignored rows.")
    score.add_argument("logits", help="logits .npy, shape [..., V] (memory-mapped)")
    score.add_argument("labels", help="labels .npy, shape logits.shape[:-1] (or flat)")
    score.add_argument("--beta", type=float, required=True, help="weight of the pre-training term")
    score.add_argument("--rl-loss", type=float, required=True, help="the RL objective's loss value")
    score.add_argument("--ignore-index", type=int, default=config.DEFAULT_IGNORE_INDEX)
    score.add_argument("--backend", default="auto", help=f"auto or one of {', '.join(_dispatch.BACKENDS)}")
    score.add_argument("--block-rows", type=_positive_int, default=None,
                       help="rows per block (default: about SCORE_BLOCK_BYTES of logits)")
    score.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a TTY")
    score.add_argument("--json", action="store_true", help="print the result as one JSON object")
    score.set_defaults(run=_cmd_score)

    bench = sub.add_parser("bench", help="time every backend side by side on synthetic logits",
                           description="Time every available backend, the stream-read floor and torch.")
    bench.add_argument("--vocab", type=_int_list, help=f"V values (default {_bench.DEFAULT_VOCAB})")
    bench.add_argument("--rows", type=_int_list, help=f"N values (default {_bench.DEFAULT_ROWS})")
    bench.add_argument("--dtype", type=_name_list, help=f"from {','.join(_bench.DTYPES)} (default float32)")
    bench.add_argument("--threads", type=_int_list, help="thread counts (default: Numba's)")
    bench.add_argument("--repeat", type=_positive_int, default=_bench.DEFAULT_REPEAT, help="timed calls")
    bench.add_argument("--backends", type=_name_list, help="contenders (default: all available)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the synthetic logits")
    bench.add_argument("--csv", help="merge results into this CSV (keyed by op..machine)")
    bench.add_argument("--plot", help="PNG of GB/s against V, drawn from the CSV data")
    bench.set_defaults(run=_cmd_bench)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _error(message: str, code: int) -> int:
    text = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 on success)."""
    try:
        args = build_parser().parse_args(argv)
    except CLIError as exc:
        return _error(exc, EXIT_USAGE)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.run(args)
    except CLIError as exc:
        return _error(exc, EXIT_FAILURE)
    except (ValueError, TypeError, OSError, MemoryError, KernelUnavailable,
            _dispatch.BackendUnavailableError) as exc:
        if os.environ.get("PTX_NUMBA_DEBUG"):
            raise
        return _error(f"{type(exc).__name__}: {exc}" if isinstance(exc, MemoryError) else exc, EXIT_FAILURE)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as exc:  # a bug: still one line, but say how to get the traceback
        if os.environ.get("PTX_NUMBA_DEBUG"):
            raise
        return _error(f"unexpected {type(exc).__name__}: {exc} (set PTX_NUMBA_DEBUG=1 for a traceback)",
                      EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
