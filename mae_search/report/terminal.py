"""What a search prints in the terminal when it ends: its trials, best first, and the reference rows."""

from __future__ import annotations

import re
import textwrap

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mae_search.metrics import REGISTRY
from mae_search.metrics import metric as registered_metric
from mae_search.report.labels import fmt_setting, round_value
from mae_search.search.record import PARAM_PREFIX, Status
from mae_search.search.results import by_configuration, reference_rows


def rank_trials(df: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Final rows ranked only among comparable trials: completed ones by the metric, then the ones stopped
    early (latest rung first, then the metric at it), then failed and running ones."""
    order = {Status.COMPLETED.value: 0, Status.STOPPED.value: 1}
    df = df.assign(_group=df["status"].map(order).fillna(2), _epoch=-df["epoch"])
    if metric in df:
        return df.sort_values(["_group", "_epoch", metric], ascending=[True, True, mode == "min"],
                              na_position="last").drop(columns=["_group", "_epoch"])
    return df.sort_values(["_group", "_epoch"]).drop(columns=["_group", "_epoch"])


def print_trials(console: Console, df: pd.DataFrame, metric: str, mode: str,
                 space_labels: dict[str, str] | None = None) -> None:
    """The final row of each trial, best first; a seed-averaged trial is one row: mean ± std over its seeds.

    No value ever wraps (a number split over two lines reads as two numbers): each column is at least as
    wide as its longest value and its header's longest word, and headers wrap between words. When one
    column per searched parameter cannot fit the terminal, the table leaves them out and each trial's
    searched values follow it as ``name=value`` items, which wrap between items.
    """
    if df.empty:
        console.print("no trial reported a result")
        return
    params = [c for c in df.columns if c.startswith(PARAM_PREFIX)]
    df = rank_trials(by_configuration(df, metric), metric, mode)
    averaged = (df["seeds"] > 1).any()
    spec = registered_metric(metric)
    labels = {p: (space_labels or {}).get(p, p.removeprefix(PARAM_PREFIX)) for p in params}
    caption = (f"completed trials first, ranked by {mode} {spec.label}; stopped ones by the epoch they reached"
               if (df["status"] == Status.STOPPED).any() else None)
    values = {p: [fmt_setting(round_value(v)) for v in df[p]] for p in params}
    ids = [("trial", list(df["trial_id"])),
           ("status", ["stopped" if s == Status.STOPPED else str(s) for s in df["status"]]),
           ("seeds" if averaged else "seed", [str(v) for v in df["seeds" if averaged else "seed"]])]
    tail = [("epoch", [str(e) for e in df["epoch"]]), (spec.label, [_metric_cell(r, metric, spec, averaged)
                                                                   for _, r in df.iterrows()])]
    wide = [*ids, *[(labels[p], values[p]) for p in params], *tail]
    if sum(_width(h, cells) + 3 for h, cells in wide) + 1 <= console.width:  # a cell: its text, 2 pads, 1 rule
        console.print(_table(wide, caption, console.width))
        return
    console.print(_table([*ids, *tail], caption, console.width))
    console.print("searched values, in the table's order:", highlight=False)
    for i, trial in enumerate(df["trial_id"]):
        items = " ".join(f"{labels[p].replace(' ', '_')}={values[p][i]}" for p in params)
        console.print(textwrap.fill(items, console.width, initial_indent=f"  {trial}: ", subsequent_indent="    ",
                                    break_long_words=False, break_on_hyphens=False), highlight=False)


def _metric_cell(row: pd.Series, metric: str, spec, averaged: bool) -> str:
    value, std = row.get(metric), row.get(f"{metric}_std")
    shown = "-" if value is None or value != value else f"{value * spec.scale:.{spec.digits}f}"
    if averaged and shown != "-" and std == std and std is not None:
        shown += f" ± {std * spec.scale:.{spec.digits}f}"
    return shown


def _width(header: str, cells: list[str]) -> int:
    """The narrowest a column can be: its longest value, and its header's longest word."""
    return max([len(c) for c in cells] + [len(w) for w in header.split()])


def _table(columns: list[tuple[str, list[str]]], caption: str | None, width: int) -> Table:
    """Fixed column widths: each column's natural width (its longest value or whole header), narrowed
    column by column, widest header slack first, towards :func:`_width` until the table fits ``width``."""
    natural = [max([len(c) for c in cells] + [len(header)]) for header, cells in columns]
    narrowest = [_width(header, cells) for header, cells in columns]
    widths = list(natural)
    excess = sum(widths) + 3 * len(widths) + 1 - width
    while excess > 0 and widths != narrowest:
        i = max(range(len(widths)), key=lambda k: widths[k] - narrowest[k])
        widths[i] -= 1
        excess -= 1
    table = Table(caption=caption)
    for (header, _), w in zip(columns, widths, strict=True):
        table.add_column(header, width=w, overflow="ellipsis")
    for row in zip(*(cells for _, cells in columns), strict=True):
        table.add_row(*row)
    return table


def print_references(console: Console, df: pd.DataFrame) -> None:
    """One line per reference kind (mean over its seeds): what the trials above must beat, on the test
    split and on the validation split the search selected on."""
    short = {m.name: m.short for m in REGISTRY if m.short}
    for kind, rows in reference_rows(df).groupby("reference", sort=True):
        shown = [f"{name} {rows[k].mean() * 100:.1f} %" for k, name in short.items()
                 if k in rows and rows[k].notna().any()]
        seeds = f"{len(rows)} seed{'s' if len(rows) > 1 else ''}"
        line = f"reference {kind.replace('_', '-')} ({seeds}): " + ", ".join(shown)
        console.print(_wrap(line, console.width, glued=shown, indent="  "), highlight=False, soft_wrap=True)


def _wrap(text: str, width: int, glued: list[str], indent: str = "") -> str:
    """``text`` wrapped between words at ``width``, never inside one of the ``glued`` phrases (a number
    with its unit or interval reads wrong split over two lines)."""
    for phrase in glued:
        text = text.replace(phrase, phrase.replace(" ", "\xa0"))
    return "\n".join(textwrap.wrap(text, width, subsequent_indent=indent, break_long_words=False,
                                   break_on_hyphens=False)).replace("\xa0", " ")


def print_verdict(console: Console, text: str) -> None:
    """The verdict paragraph (Markdown **bold** as the report writes it), wrapped between words but never
    inside a number with its interval (``+12.0 ± 1.0 (n=5)`` stays on one line)."""
    margins = re.findall(r"[+-]\d+\.?\d* ± \d+\.?\d* \(n=\d+\)|[+-]\d+\.?\d* \(n=\d+\)", text)
    shown = _wrap(text, console.width, glued=margins)
    console.print(re.sub(r"\*\*(.+?)\*\*", r"[bold]\1[/bold]", escape(shown)), soft_wrap=True, highlight=False)
