"""A report as a document (headings, paragraphs, tables, images) and its three renderings: Markdown
(README.md, tables GitHub renders), one self-contained HTML file, and a LaTeX table per table."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from mae_search.search.record import BEST_GRID_FILE


@dataclass
class Table:
    name: str
    headers: list[str]
    rows: list[list[str]]
    bold_row: int | None = None
    caption: str = ""
    bold_columns: tuple[int, ...] | None = None  # the bold row's cells that are bold (None: all of them)

    def is_bold(self, row: int, column: int) -> bool:
        return row == self.bold_row and (self.bold_columns is None or column in self.bold_columns)



@dataclass
class Report:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    vectors: dict[str, bytes] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.tables.append(table)
        self.blocks.append(("table", table))

    def image(self, name: str, figure: Figure | bytes, alt: str) -> None:
        """A figure (PNG + SVG), or a PNG that has no vector form (the reconstruction grid)."""
        self.images[name] = figure.png if isinstance(figure, Figure) else figure
        if isinstance(figure, Figure):
            self.vectors[name.removesuffix(".png") + ".svg"] = figure.svg
        self.blocks.append(("img", (name, alt)))



@dataclass(frozen=True)
class Figure:
    """A plot as a paper needs it: a 300-dpi PNG (embedded in the HTML) and a vector SVG."""

    png: bytes
    svg: bytes



def render_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    for kind, payload in report.blocks:
        if kind == "h2":
            out += [f"## {payload}", ""]
        elif kind == "p":
            out += [payload, ""]
        elif kind == "img":
            name, alt = payload
            out += [f"![{alt}]({name})", ""]
        else:
            out += [*_markdown_table(payload), ""]
    return "\n".join(out).rstrip() + "\n"



def _markdown_table(t: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in t.headers) + " |", "|" + "|".join("---" for _ in t.headers) + "|"]
    for i, row in enumerate(t.rows):
        cells = [f"**{cell(c)}**" if t.is_bold(i, j) else cell(c) for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if t.caption:
        lines += ["", f"*{t.caption}*"]
    return lines



def render_html(report: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "td:first-child{text-align:left}td.best{font-weight:bold}img{max-width:100%;height:auto}</style>"
             "</head><body>",
             f"<h1>{html.escape(report.title)}</h1>"]
    for kind, payload in report.blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(payload)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{_inline(payload)}</p>")
        elif kind == "img":
            name, alt = payload
            png = report.images[name]
            data = base64.b64encode(png).decode()
            width = int.from_bytes(png[16:20], "big")  # IHDR: shown at 100 dpi, so a 300-dpi plot stays sharp
            shown = width // 3 if name != BEST_GRID_FILE else width
            parts.append(f"<img alt='{html.escape(alt)}' style='width:{shown}px' src='data:image/png;base64,{data}'>")
        else:
            t: Table = payload
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr>")
            for i, row in enumerate(t.rows):
                parts.append("<tr>" + "".join(f"<td{_best(t, i, j)}>{html.escape(c)}</td>"
                                              for j, c in enumerate(row)) + "</tr>")
            parts.append("</table>")
            if t.caption:
                parts.append(f"<p><em>{html.escape(t.caption)}</em></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _best(t: Table, row: int, column: int) -> str:
    return " class='best'" if t.is_bold(row, column) else ""


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}



def _latex(text: str) -> str:
    out = "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("−", "-")



def render_latex(t: Table) -> str:
    """A booktabs table to \\input{} into a paper (needs \\usepackage{booktabs}); the best row in bold."""
    lines = [r"\begin{tabular}{l" + "r" * (len(t.headers) - 1) + "}", r"\toprule",
             " & ".join(_latex(h) for h in t.headers) + r" \\", r"\midrule"]
    for i, row in enumerate(t.rows):
        cells = [r"\textbf{" + _latex(c) + "}" if t.is_bold(i, j) else _latex(c) for j, c in enumerate(row)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.caption:
        lines.insert(0, "% " + t.caption.replace("\n", " "))
    return "\n".join(lines) + "\n"



def _inline(text: str) -> str:
    """The little Markdown the report's paragraphs use: **bold** and `code`."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
