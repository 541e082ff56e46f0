"""What a search prints in the terminal when it ends: its trials, best first, and the reference rows."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table

from mae_search.metrics import REGISTRY
from mae_search.metrics import metric as registered_metric
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
    """The final row of each trial, best first; a seed-averaged trial is one row: mean ± std over its seeds."""
    if df.empty:
        console.print("no trial reported a result")
        return
    params = [c for c in df.columns if c.startswith(PARAM_PREFIX)]
    df = rank_trials(by_configuration(df, metric), metric, mode)
    averaged = (df["seeds"] > 1).any()
    spec = registered_metric(metric)
    space_labels = space_labels or {}
    table = Table(caption=f"completed trials first, ranked by {mode} {spec.label}; stopped ones by the epoch "
                          "they reached" if (df["status"] == Status.STOPPED).any() else None)
    # Identity and status never wrap; the searched values and the objective fold to fit the terminal.
    table.add_column("trial", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("seeds" if averaged else "seed", overflow="fold")
    for p in params:
        table.add_column(space_labels.get(p, p.removeprefix(PARAM_PREFIX)), overflow="fold", min_width=5)
    table.add_column("epoch", overflow="fold")
    table.add_column(spec.label, overflow="fold", min_width=5)
    for _, row in df.iterrows():
        value, std = row.get(metric), row.get(f"{metric}_std")
        shown = "-" if value is None or value != value else f"{value * spec.scale:.{spec.digits}f}"
        if averaged and shown != "-" and std == std and std is not None:
            shown += f" ± {std * spec.scale:.{spec.digits}f}"
        status = "stopped" if row["status"] == Status.STOPPED else row["status"]
        table.add_row(
            row["trial_id"], status, str(row["seeds"] if averaged else row["seed"]),
            *[f"{row[p]:.3g}" if isinstance(row[p], float) else str(row[p]) for p in params],
            str(row["epoch"]), shown,
        )
    console.print(table)


def print_references(console: Console, df: pd.DataFrame) -> None:
    """One line per reference kind (mean over its seeds): what the trials above must beat."""
    short = {m.name: m.short for m in REGISTRY if m.short}
    for kind, rows in reference_rows(df).groupby("reference", sort=True):
        shown = [f"{name} {rows[k].mean() * 100:.1f} %" for k, name in short.items()
                 if k in rows and rows[k].notna().any()]
        seeds = f"{len(rows)} seed{'s' if len(rows) > 1 else ''}"
        console.print(f"reference {kind.replace('_', '-')} ({seeds}): {', '.join(shown)}", highlight=False)
