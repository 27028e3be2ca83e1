"""``ptx-numba bench``: every backend timed side by side on synthetic logits."""
from __future__ import annotations

import argparse
import os

from .. import _bench, _bench_report
from ._errors import CLIError


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names, at least one."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _check_output(path: str | None, option: str) -> None:
    """An output file's directory must exist: a typo must not create directories."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError(f"{option}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{option}: {path} is a directory")


def _default_threads() -> int:
    import numba

    from ..cpu import threads

    threads.prepare()  # before Numba starts its threads: the layer the kernels will use (docs/threads.md)
    return numba.get_num_threads()


def _run_case(case, contenders, args, machine) -> list[dict]:
    """Time one case, print its table; return its CSV records."""
    results = _bench.run_case(case, contenders, args.repeat, seed=args.seed)
    nbytes = _bench.logits_nbytes(case)
    print(_bench_report.format_table(case, results, nbytes, machine), end="\n\n", flush=True)
    return _bench_report.csv_records(case, results, nbytes, machine)


def run(args) -> int:
    """The ``bench`` command."""
    _check_output(args.csv, "--csv")
    _check_output(args.plot, "--plot")
    try:
        dtypes = args.dtype or ["float32"]
        for name in dtypes:
            _bench.numpy_dtype(name)
        ops = [op.name for op in _bench.check_ops(args.op or [_bench.DEFAULT_OP])]
        contenders = _bench.resolve_contenders(args.backends)
        threads = args.threads or [_default_threads()]
        _bench.check_threads(threads)
        if args.plot:
            _bench_report.require_matplotlib()
        machine = _bench.machine_description()
        records: list[dict] = []
        for op in ops:
            for dtype in dtypes:
                for vocab in args.vocab or [_bench.DEFAULT_VOCAB]:
                    for rows in args.rows or [_bench.DEFAULT_ROWS]:
                        for k in threads:
                            case = _bench.Case(dtype, rows, vocab, k, op)
                            records += _run_case(case, contenders, args, machine)
        if args.csv:
            records = _bench_report.update_csv(args.csv, records)
            print(f"wrote {args.csv}")
        if args.plot:
            _bench_report.plot_gbps(records, args.plot, machine)
            print(f"wrote {args.plot}")
    except _bench.BenchError as exc:
        raise CLIError(str(exc)) from None
    return 0


def add_parser(sub, positive_int) -> None:
    """Register the ``bench`` sub-command."""
    bench = sub.add_parser("bench", help="time every backend side by side on synthetic logits",
                           description="Time every available backend, the stream-read floor and torch, op by op.")
    bench.add_argument("--vocab", type=int_list, help=f"V values (default {_bench.DEFAULT_VOCAB})")
    bench.add_argument("--rows", type=int_list, help=f"N values (default {_bench.DEFAULT_ROWS})")
    bench.add_argument("--op", type=name_list,
                       help=f"ops from {','.join(_bench.OPS)} (default {_bench.DEFAULT_OP})")
    bench.add_argument("--dtype", type=name_list, help=f"from {','.join(_bench.DTYPES)} (default float32)")
    bench.add_argument("--threads", type=int_list, help="thread counts (default: Numba's)")
    bench.add_argument("--repeat", type=positive_int, default=_bench.DEFAULT_REPEAT, help="timed calls")
    bench.add_argument("--backends", type=name_list, help="contenders (default: all available)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the synthetic logits")
    bench.add_argument("--csv", help="merge results into this CSV (keyed by op..machine)")
    bench.add_argument("--plot", help="PNG of GB/s against V, drawn from the CSV data")
    bench.set_defaults(run=run)
