"""MkDocs hooks: the Performance page's figures and tables, drawn from docs/results/*.csv.

- ``on_files`` draws every figure (docs/gen_plots.py) into a temporary folder and adds it to the
  site, so the figures are never older than the committed CSVs and none is committed itself.
- ``on_page_markdown`` replaces ``<!-- results-table: FILE OP N[,N...] [threads=T] -->`` by the Markdown
  table of ``OP`` at batch size ``N`` (and T threads) from ``results/FILE``, and ``<!-- results-figures -->`` by every
  figure with its caption (machine, date, command).
- ``on_page_content`` turns the Sphinx roles of the docstrings (``:func:`cross_entropy```) into
  cross-references of the API pages (plain code where the name has no page), and ``:math:``
  roles into typeset math.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

from mkdocs.structure.files import File

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_plots  # noqa: E402  (docs/gen_plots.py, beside this file)

_FIGURES: list = []
_TABLE = re.compile(r"^([ \t]*)<!--\s*results-table:\s*(\S+)\s+(\S+)\s+([\d,]+)(?:\s+threads=(\d+))?\s*-->", re.M)
_FIGS = re.compile(r"<!--\s*results-figures\s*-->")


def on_files(files, config):
    out = tempfile.mkdtemp(prefix="ptx-numba-docs-plots-")
    _FIGURES[:] = gen_plots.figures(out, os.path.join(config["docs_dir"], "results"))
    for fig in _FIGURES:
        files.append(File(fig.uri, out, config["site_dir"], config["use_directory_urls"]))
    return files


def _figures_markdown(page_uri: str) -> str:
    depth = page_uri.count("/")
    blocks = []
    for fig in _FIGURES:
        src = "../" * depth + fig.uri
        blocks.append(f"![{fig.op} on {fig.machine}]({src})\n\n"
                      f"*{fig.op}, {fig.machine}: {fig.caption}. Data: [{fig.source}]"
                      f"({'../' * depth}{fig.source}).*\n")
    return "\n".join(blocks)


def on_page_markdown(markdown, page, config, files):
    def table(m):
        rows = gen_plots.read_rows(os.path.join(config["docs_dir"], "results", m.group(2)))
        table = gen_plots.results_table(rows, m.group(3), m.group(4), threads=m.group(5))
        return "\n".join(m.group(1) + line for line in table.splitlines())  # keep the indent

    markdown = _TABLE.sub(table, markdown)
    return _FIGS.sub(lambda m: _figures_markdown(page.file.src_uri), markdown)


# ``:func:`name``` in a docstring reaches the page as ``:func:<code>name</code>``.
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):\s*<code>~?([A-Za-z_][\w.]*)</code>")


def _autoref(m):
    name = m.group(1)
    identifier = name if name.startswith("ptx_numba") else f"ptx_numba.{name}"
    short = name.rsplit(".", 1)[-1] if m.group(0).find("~") >= 0 else name
    return f'<autoref optional identifier="{identifier}"><code>{short}</code></autoref>'


# ``:math:`x``` reaches the page as ``:math:<code>x</code>``: typeset it like ``\(x\)`` in Markdown.
_MATH = re.compile(r":math:\s*<code>(.*?)</code>", re.S)


def on_page_content(html, page, config, files):
    html = _MATH.sub(lambda m: f'<span class="arithmatex">\\({m.group(1)}\\)</span>', html)
    return _ROLE.sub(_autoref, html)
