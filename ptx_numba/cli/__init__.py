"""Command line: ``ptx-numba score`` (mean CE / PTX loss of .npy files or shard datasets) and ``bench``.

``score`` memory-maps the logits through one open file and walks them in row blocks of about
``config.SCORE_BLOCK_BYTES``, so files larger than RAM are scored in bounded memory; a dataset of
shards is scored shard by shard, optionally resumable (``--checkpoint``) and on Dask
(``--scheduler``/``--workers``). See docs/cli.md.

Every user error ends as one line on stderr (``ptx-numba: error: ...``) and a non-zero exit status;
set ``PTX_NUMBA_DEBUG=1`` to see the traceback of an unexpected error instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .. import __version__, _dispatch, config
from ..api import KernelUnavailable
from . import bench as _bench_cmd
from ._errors import CLIError, Parser
from .npyfile import HALF_DTYPES
from .hidden import score_hidden
from .run import DEFAULT_SCHEDULER_TIMEOUT, score
from .shard import check_ignore_index, json_ready

PROG = "ptx-numba"
EXIT_USAGE = 2
EXIT_FAILURE = 1

__all__ = ["CLIError", "build_parser", "main", "score"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _cmd_score(args) -> int:
    if args.hidden or args.weight or args.bias:
        result = _score_hidden(args)
    else:
        result = score(
        args.logits, args.labels, beta=args.beta, rl_loss=args.rl_loss,
        ignore_index=check_ignore_index(args.ignore_index), backend=args.backend,
        block_rows=args.block_rows, dtype=args.dtype, op=args.op, per_row=args.per_row,
        checkpoint=args.checkpoint, progress=True if args.progress else None, scheduler=args.scheduler,
        workers=args.workers, scheduler_timeout=args.scheduler_timeout,
        )
    if args.json:
        print(json.dumps(json_ready(result), allow_nan=False))
        return 0
    if "total" in result:
        print(f"total  {result['total']!r}")
        print(f"ptx    {result['ptx']!r}")
    print(f"ce     {result['ce']!r}")
    print(f"tokens {result['tokens']}")
    print(f"rows   {result['rows']} ({result['valid_rows']} valid, {result['blocks']} blocks, "
          f"{result['shards']} shard{'s' if result['shards'] != 1 else ''})")
    print(f"backend {result['backend']}")
    return 0


def _score_hidden(args) -> dict:
    """The ``--hidden/--weight`` form: the one positional is the labels file."""
    if not (args.hidden and args.weight):
        raise CLIError("--hidden and --weight go together (hidden states and the [V, D] LM head)")
    if args.labels is not None:
        raise CLIError("with --hidden, give one positional argument: the labels .npy")
    for flag, value in (("--checkpoint", args.checkpoint), ("--per-row", args.per_row),
                        ("--scheduler", args.scheduler), ("--workers", args.workers), ("--dtype", args.dtype)):
        if value:
            raise CLIError(f"{flag} is not available with --hidden")
    return score_hidden(args.hidden, args.weight, args.logits, bias_path=args.bias, beta=args.beta,
                        rl_loss=args.rl_loss, ignore_index=check_ignore_index(args.ignore_index),
                        backend=args.backend, block_rows=args.block_rows)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ptx-numba``."""
    parser = Parser(prog=PROG, description="Fused cross entropy for the RLHF pre-training (PTX) loss.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{score,bench}", required=True, parser_class=Parser)

    s = sub.add_parser("score", help="mean CE / PTX loss of .npy files or shard datasets (streamed)",
                       description="Mean CE over non-ignored rows; with --beta also "
                                   "total = rl_loss + beta * mean CE.")
    s.add_argument("logits", help="logits .npy [..., V], or a directory / glob of logits-*.npy shards")
    s.add_argument("labels", nargs="?", help="labels .npy, shape logits.shape[:-1] (or flat); "
                                            "omitted for a dataset")
    s.add_argument("--beta", type=float, help="weight of the pre-training term (reports total and ptx)")
    s.add_argument("--rl-loss", type=float, help="the RL objective's loss value (default 0 with --beta)")
    s.add_argument("--ignore-index", type=int, default=config.DEFAULT_IGNORE_INDEX)
    s.add_argument("--backend", default="auto", help=f"auto or one of {', '.join(_dispatch.BACKENDS)}")
    s.add_argument("--block-rows", type=_positive_int, default=None,
                   help="rows per block (default: about SCORE_BLOCK_BYTES of logits)")
    s.add_argument("--dtype", choices=HALF_DTYPES, type=_half_dtype,
                   help="read 2-byte logits (int16/uint16 bits, raw V2) as this type")
    s.add_argument("--op", choices=("ce", "logprobs"), default="ce", help="what --per-row holds")
    s.add_argument("--per-row", metavar="OUT.npy", help="write per-row CE (or log-probs) to this .npy")
    s.add_argument("--checkpoint", metavar="FILE", help="record finished shards here; resume from it")
    s.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run the shards on this Dask scheduler")
    s.add_argument("--workers", type=_positive_int, help="run the shards on a local Dask cluster")
    s.add_argument("--scheduler-timeout", type=_positive_float, default=DEFAULT_SCHEDULER_TIMEOUT,
                   help=f"seconds to wait for --scheduler (default {DEFAULT_SCHEDULER_TIMEOUT:g})")
    s.add_argument("--hidden", metavar="H.npy", help="score hidden states [..., D] through --weight "
                   "(then the one positional argument is the labels .npy)")
    s.add_argument("--weight", metavar="W.npy", help="the LM head [V, D] for --hidden")
    s.add_argument("--bias", metavar="B.npy", help="the LM head's bias [V] for --hidden")
    s.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a TTY")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(run=_cmd_score)

    _bench_cmd.add_parser(sub, _positive_int)
    return parser


def _half_dtype(text: str) -> str:
    if text not in HALF_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(HALF_DTYPES)}, got {text!r}")
    return text


def _error(message: str, code: int) -> int:
    text = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 on success)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "score" and args.scheduler and args.workers:
            raise CLIError("give --scheduler or --workers, not both")
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
