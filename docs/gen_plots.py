"""Figures and tables for the Performance page, drawn from the committed benchmark CSVs.

Every ``docs/results/*.csv`` written by ``ptx-numba bench --csv`` gives one figure per op and
machine (GB/s against V, a panel per dtype, each backend beside torch and the stream-read floor),
drawn by the same function as ``ptx-numba bench --plot``. Each figure states the machine, the date
and the command of the run: from the CSV's ``date`` and ``command`` columns when it has them,
otherwise from the ``<name>.json`` file next to the CSV (``{"date": ..., "command": ...}``).

The MkDocs hook (``docs/hooks.py``) calls :func:`figures` at build time, so the site's figures
are never older than the CSV. Run it by hand to look at them::

    python docs/gen_plots.py --out /tmp/plots
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Figure:
    """One figure: where it goes in the site, and what it shows."""

    uri: str  #: path inside the site, e.g. ``results/plots/cpu-cross_entropy.png``
    source: str  #: the CSV it was drawn from
    op: str
    machine: str
    caption: str  #: "measured <date> with `<command>`" (Markdown)


def read_rows(path: str) -> list[dict]:
    """The rows of one results CSV, as string dictionaries."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_info(path: str, rows: list[dict], machine: str) -> tuple[str, list[str]]:
    """``(date, commands)`` of the measurements of ``machine`` in the CSV at ``path``.

    Raises
    ------
    ValueError
        When neither the CSV columns nor the JSON file beside it say when and how it was measured:
        a figure without its date and command is not published.
    """
    mine = [r for r in rows if r.get("machine") == machine]
    if mine and all(r.get("date") for r in mine) and all(r.get("command") for r in mine):
        dates = sorted({r["date"] for r in mine})
        date = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        return date, sorted({r["command"] for r in mine})
    meta = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(meta):
        raise ValueError(f"{path}: no date/command columns and no {os.path.basename(meta)} beside it")
    with open(meta, encoding="utf-8") as f:
        info = json.load(f)
    info = info.get(machine, info)
    if not info.get("date") or not info.get("command"):
        raise ValueError(f"{meta}: needs 'date' and 'command' (for machine {machine!r})")
    command = info["command"]
    return info["date"], list(command) if isinstance(command, list) else [command]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def figures(out_dir: str, results_dir: str = RESULTS) -> list[Figure]:
    """Draw every figure of every CSV in ``results_dir`` into ``out_dir``; return what was drawn."""
    from ptx_numba._bench_report import plot_gbps

    drawn = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".csv"):
            continue
        path = os.path.join(results_dir, name)
        rows = read_rows(path)
        stem = os.path.splitext(name)[0]
        machines = sorted({r["machine"] for r in rows})
        for machine in machines:
            date, commands = run_info(path, rows, machine)
            ops = sorted({r["op"] for r in rows if r["machine"] == machine})
            for op in ops:
                parts = [stem] + ([_slug(machine)] if len(machines) > 1 else []) + [op]
                uri = "results/plots/" + "-".join(parts) + ".png"
                caption = f"measured {date} with " + " and ".join(f"`{c}`" for c in commands)
                plot_gbps(rows, os.path.join(out_dir, uri), machine, op=op,
                          caption=f"measured {date} with\n" + "\n".join(commands))
                drawn.append(Figure(uri, f"results/{name}", op, machine, caption))
    return drawn


def _ms(row: dict | None) -> str:
    if row is None or not row["seconds"]:
        return ""
    ms = float(row["seconds"]) * 1e3
    return f"{ms:.{0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3}f}"


def results_table(rows: list[dict], op: str, n: str, threads: str | None = None,
                  machine: str | None = None) -> str:
    """A Markdown table of ``op`` at the batch sizes ``n`` (``"512"`` or ``"1,4"``).

    One line per dtype, N, V and thread count: the cpu backend's and torch's time in ms, the cpu
    backend's speed as a share of the floor's (the stream read of the same bytes), its speed-up
    over torch and its largest error against the float64 reference. ``threads`` keeps one thread
    count. The N, V and threads columns appear only when they vary; columns with no value anywhere
    are left out.
    """
    sizes = n.split(",")
    rows = [r for r in rows if r["N"] in sizes and (machine is None or r["machine"] == machine)
            and (threads is None or r["threads"] == threads)]
    index = {(r["op"], r["backend"], r["dtype"], r["N"], r["V"], r["threads"]): r for r in rows}
    keys = sorted({(r["dtype"], int(r["N"]), int(r["V"]), int(r["threads"]))
                   for r in rows if r["op"] == op},
                  key=lambda k: (_DTYPE_ORDER.get(k[0], 9), -k[3], k[1], k[2]))
    if not keys:
        raise ValueError(f"no {op} rows with N={n} to tabulate")

    def cell(r, column, fmt):
        return fmt(float(r[column])) if r and r[column] else ""

    table = []
    for dtype, rows_n, v, t in keys:
        key = (dtype, str(rows_n), str(v), str(t))
        cpu, torch = index.get((op, "cpu") + key), index.get((op, "torch") + key)
        table.append({
            "dtype": dtype, "N": str(rows_n), "V": str(v), "threads": str(t),
            "cpu ms": _ms(cpu), "% of floor": cell(cpu, "pct_of_read", lambda x: f"{x:.0f}%"),
            "torch ms": _ms(torch), "vs torch": cell(cpu, "speedup_vs_torch", lambda x: f"{x:.1f}x"),
            "max error": cell(cpu, "max_rel_err", lambda x: f"{x:.1e}"),
        })
    columns = [c for c in table[0] if any(line[c] for line in table)
               and (c not in ("N", "V", "threads") or len({line[c] for line in table}) > 1)]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c == "dtype" else "--:" for c in columns) + "|"]
    lines += ["| " + " | ".join(line[c] for c in columns) + " |" for line in table]
    return "\n".join(lines)


_DTYPE_ORDER = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary one)")
    parser.add_argument("--results", default=RESULTS, help="folder of results CSVs")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="ptx-numba-plots-")
    for fig in figures(out, args.results):
        print(os.path.join(out, fig.uri), "-", fig.op, "-", fig.machine, "-", fig.caption)
    return 0


if __name__ == "__main__":
    sys.exit(main())
