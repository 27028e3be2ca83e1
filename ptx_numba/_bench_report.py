"""Results of ``ptx-numba bench`` as data: the printed table, the CSV and the plot drawn from it.

A CSV row is keyed by ``(op, backend, dtype, N, V, threads, machine)``; re-measuring a key replaces
its row, so the file is the latest result for every shape measured on every machine, and the plot
(GB/s against V, the stream-read floor dashed) is always drawn from it, never from a run's memory.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import textwrap

from ._bench import (
    DTYPES,
    OP_CROSS_ENTROPY,
    OPS,
    STREAM_READ,
    TORCH,
    BenchError,
    Case,
    Result,
    threading_layer,
)

#: Columns of the CSV written by ``--csv``, in order; the first seven identify a row.
CSV_COLUMNS = (
    "op", "backend", "dtype", "N", "V", "threads", "machine",
    "seconds", "gbps", "pct_of_read", "speedup_vs_torch", "max_rel_err",
)
KEY_COLUMNS = CSV_COLUMNS[:7]


def fmt(value: float | None) -> str:
    """A CSV cell: 6 significant digits, empty for a missing value."""
    return "" if value is None else f"{value:.6g}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    """A speed-up cell such as ``12.30x``, empty when either time is missing."""
    return "" if numerator is None or denominator is None else f"{numerator / denominator:.2f}x"


def _seconds_of(results: list[Result], name: str) -> float | None:
    return next((r.seconds for r in results if r.backend == name), None)


def csv_records(case: Case, results: list[Result], logits_bytes: int, machine: str) -> list[dict]:
    """The CSV rows (strings, ``CSV_COLUMNS`` keys) for one case."""
    floor = _seconds_of(results, STREAM_READ)
    torch_s = _seconds_of(results, TORCH)
    records = []
    for r in results:
        if r.seconds is None:
            continue
        records.append({
            "op": case.op,
            "backend": r.backend, "dtype": case.dtype, "N": str(case.rows), "V": str(case.vocab),
            "threads": str(case.threads), "machine": machine,
            "seconds": fmt(r.seconds), "gbps": fmt(logits_bytes / r.seconds / 1e9),
            "pct_of_read": fmt(None if floor is None else 100.0 * floor / r.seconds),
            "speedup_vs_torch": fmt(None if torch_s is None else torch_s / r.seconds),
            "max_rel_err": fmt(r.max_rel_err),
        })
    return records


def format_table(case: Case, results: list[Result], logits_bytes: int, machine: str) -> str:
    """A plain-text table for one case."""
    floor = _seconds_of(results, STREAM_READ)
    ref = _seconds_of(results, "reference")
    torch_s = _seconds_of(results, TORCH)
    moved = "" if OPS[case.op].traffic == 1 else " moved"  # the floor's bytes: reads, a copy
    title = (f"{'' if case.op == OP_CROSS_ENTROPY else case.op + ': '}"
             f"{case.dtype} logits [N={case.rows}, V={case.vocab}], {logits_bytes / 1e6:.1f} MB{moved}, "
             f"{case.threads} thread{'s' if case.threads > 1 else ''} (numba {threading_layer()}), {machine}")
    header = (f"{'backend':<12}{'time ms':>10}{'GB/s':>9}{'% read':>9}{'vs ref':>9}{'vs torch':>10}"
              f"{'max rel err':>13}")
    lines = [title, header, "-" * len(header)]
    for r in results:
        if r.seconds is None:
            lines.append(f"{r.backend:<12}  failed: {r.error}")
            continue
        pct = "" if floor is None else f"{100.0 * floor / r.seconds:.1f}%"
        err = "" if r.max_rel_err is None else f"{r.max_rel_err:.2e}"
        lines.append(
            f"{r.backend:<12}{r.seconds * 1e3:>10.3f}{logits_bytes / r.seconds / 1e9:>9.2f}{pct:>9}"
            f"{ratio(ref, r.seconds):>9}{ratio(torch_s, r.seconds):>10}{err:>13}"
        )
    return "\n".join(lines)


def update_csv(path: str, records: list[dict]) -> list[dict]:
    """Merge ``records`` into the CSV at ``path`` and return all of its rows.

    Rows are keyed by ``KEY_COLUMNS``: a new measurement replaces an old one with the same key, so
    re-running a shape updates it rather than piling up duplicates.
    """
    existing: list[dict] = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                raise BenchError(f"{path} has columns {reader.fieldnames}, expected {list(CSV_COLUMNS)}")
            existing = list(reader)
    fresh = {tuple(r[k] for k in KEY_COLUMNS) for r in records}
    merged = [r for r in existing if tuple(r[k] for k in KEY_COLUMNS) not in fresh] + records
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(merged)
    os.replace(tmp, path)
    return merged


def require_matplotlib() -> None:
    """Fail early, before any timing, when ``--plot`` cannot work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'ptx_numba[bench]'")


#: Line colours per backend (the floor is black); unknown backends get matplotlib's cycle.
_COLORS = {"cpu": "tab:blue", "cuda": "tab:green", "reference": "tab:gray", TORCH: "tab:orange",
           STREAM_READ: "black"}


def _plotted_rows(records: list[dict], machine: str, op: str) -> tuple[list[dict], str]:
    """The rows of ``op`` (and their stream-read floor) to plot, and the batch size N they share.

    A figure of GB/s against V needs several V per line: it takes the N measured at the most
    vocabulary sizes (ties: the largest N); other N appear in the tables, not the figure.
    """
    rows = [r for r in records if r["machine"] == machine and r["gbps"] and r["op"] == op]
    if not any(r["backend"] != STREAM_READ for r in rows):
        raise BenchError(f"no measurements for {machine!r} to plot (op {op!r})")
    vocabs: dict[str, set] = {}
    for r in rows:
        if r["backend"] != STREAM_READ:
            vocabs.setdefault(r["N"], set()).add(r["V"])
    n = max(vocabs, key=lambda k: (len(vocabs[k]), int(k)))
    return [r for r in rows if r["N"] == n], n


def plot_gbps(records: list[dict], path: str, machine: str, *, op: str = OP_CROSS_ENTROPY,
              caption: str | None = None) -> None:
    """GB/s against V for one op: a panel per dtype, a line per backend and thread count.

    Draws from CSV rows (``CSV_COLUMNS`` keys, string values) measured on ``machine``: the op's
    backends beside the stream-read floor (black), more threads solid and fewer dotted, on a log
    GB/s axis so that torch and the reference stay readable next to the kernels. One legend for
    the whole figure, below the panels, so that it never covers a line. ``caption`` (for
    example the date and command of the run) is printed under the title.
    """
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import FuncFormatter

    rows, n = _plotted_rows(records, machine, op)
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    dtypes += sorted({r["dtype"] for r in rows} - set(dtypes))
    threads = sorted({int(r["threads"]) for r in rows})
    ncols = 2 if len(dtypes) > 2 else len(dtypes)
    nrows = -(-len(dtypes) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows + 1.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, object] = {}
    for ax, dtype in zip(axes, dtypes):
        series: dict[tuple, list[tuple[int, float]]] = {}
        for r in rows:
            if r["dtype"] == dtype:
                series.setdefault((r["backend"], int(r["threads"])), []).append(
                    (int(r["V"]), float(r["gbps"])))
        for (backend, t), points in sorted(series.items(), key=lambda kv: (kv[0][0] != STREAM_READ, kv[0])):
            points.sort()
            label = backend + (f", {t} thread{'s' if t > 1 else ''}" if len(threads) > 1 else "")
            most = t == threads[-1]
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=label,
                              color=_COLORS.get(backend), marker="o" if most else "s", markersize=4,
                              linestyle=("--" if backend == STREAM_READ else "-") if most else ":")
            handles.setdefault(label, line)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        vocab = sorted({v for points in series.values() for v, _ in points})
        ax.set_xticks(vocab, [f"{v / 1000:.0f}k" if v >= 10_000 else str(v) for v in vocab])
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("GB/s of logits read")
        ax.set_title(f"{dtype} [N={n}, V]")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(dtypes):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncols=min(len(handles), 4), fontsize="small", frameon=False)
    title = f"{op} throughput, {machine}"
    if caption:  # commands are long: wrap them to the figure's width
        width = int(12 * fig.get_figwidth())  # about 12 characters per inch at this size
        caption = "\n".join(textwrap.fill(line, width, subsequent_indent="    ", break_on_hyphens=False)
                             for line in caption.splitlines())
        title = f"{title}\n{caption}"
    fig.suptitle(title, fontsize="medium")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
