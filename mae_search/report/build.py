"""Ablation reports regenerated from recorded results, never from numbers typed by hand.

Input is a trials table -- read from a search's ``results.parquet`` or rebuilt
from its MLflow experiment; both give the same columns, so both give the same
report. The report is a list of blocks (headings, paragraphs, tables,
images) rendered to Markdown (``README.md``, tables GitHub renders), one
self-contained HTML file, and CSV per table. Every number is formatted from
the table; nothing depends on time or machine, so the Markdown is
byte-identical on a rerun.

Each report archives its input under ``<out>/data/`` (table, search space,
best reconstruction) so the command in its header regenerates it anywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from mae_search.metrics import metric
from mae_search.report.load import (
    ReportError,
    SearchRecord,
    best_trial_target,
)
from mae_search.report.plots import plot_curves, plot_factor, plot_pareto
from mae_search.report.render import (
    Report,
    render_html,
    render_latex,
    render_markdown,
)
from mae_search.report.rungs import rung_fidelity_table
from mae_search.report.tables import (
    ablation_tables,
    best_trials_table,
    importance_table,
    pareto_table,
    stopped_table,
)
from mae_search.report.verdict import verdict
from mae_search.search.record import BEST_GRID_FILE, Status
from mae_search.search.results import final_rows
from mae_search.search.search_dir import RESULTS_FILE, SPACE_FILE
from mae_search.search.space import SearchSpace


def build_report(records: list[SearchRecord], command: str) -> Report:
    if not records:
        raise ReportError("no search to report on")
    space = records[0].space
    table = pd.concat([r.table for r in records], ignore_index=True)
    names = sorted(table["search"].unique()) if not table.empty else [space.name]
    report = Report(title=f"Report: {', '.join(names)}")
    report.text(verdict(space, table))
    report.text(f"Regenerate with `{command}` (generated from recorded results only).")
    if space.description:
        report.text(space.description)
    final = final_rows(table) if not table.empty else table
    # Counted per configuration (the seeds of a seed-averaged trial end together).
    counts = final.groupby("tune_trial_id")["status"].first().value_counts().to_dict() if not final.empty else {}
    expected = sum(r.space.total_trials() for r in records)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"
    recorded = final["tune_trial_id"].nunique() if not final.empty else 0
    each = f" x {space.seeds_per_trial} seeds" if space.seed_averaged else ""
    report.text(f"Trials recorded: {recorded} of {expected} planned{each} ({summary}). "
                f"Objective: {space.primary.mode} {space.primary.metric}.")
    report.text(selection_sentence(space, final))
    if final.empty or not (final["status"] == Status.COMPLETED).any():
        report.text("**No trial has finished yet**: tables below will fill in as trials complete.")
    if space.is_grid:
        ablation_tables(space, table, report)
        png = plot_factor(space, table)
        if png:
            report.image("factor.png", png, "metric vs ablated factor")
    else:
        best_trials_table(space, table, report)
        importance_table(space, table, report)
    front = pareto_table(space, table, report)
    png = plot_pareto(space, table, front)
    if png is not None and not front.empty:
        report.image("pareto.png", png, "Pareto front: accuracy vs pretraining time")
    stopped_table(table, space, report)
    rung_fidelity_table(space, table, report)
    curves = plot_curves(space, table)
    if curves:
        report.heading("Learning curves")
        report.image("curves.png", curves, "learning curves")
    shown = next((r for r in records if r.grid_png), None)
    if shown:
        report.heading("Best trial: reconstructions")
        report.text(grid_caption(best_trial_target(shown)))
        report.image(BEST_GRID_FILE, shown.grid_png, "best trial reconstructions")
    return report



def grid_caption(target: str | None) -> str:
    """The grid's columns in words; a HOG target predicts no pixels, so there is no reconstruction to show."""
    if target == "hog":
        return ("Columns: original | masked. The best trial reconstructs HOG features, which are not an image: "
                "its two reconstruction columns repeat the masked image.")
    return "Columns: original | masked | reconstruction | reconstruction with visible patches."


def selection_sentence(space: SearchSpace, final: pd.DataFrame) -> str:
    """Which split picked the best, in words: the report's numbers mean different things either way."""
    label = metric(space.primary.metric).label
    if space.select_on == "test":
        return (f"**Selected on the test split** (the search had no validation split, or its space says "
                f"select_on: test): the same {label} numbers pick and score the best setting below, so its lead "
                "is optimistic.")
    counts = final["eval_val_images"].dropna() if "eval_val_images" in final else pd.Series(dtype=float)
    size = f"{int(counts.iloc[0]):,} " if len(counts) and counts.nunique() == 1 else ""
    return (f"Selected on the validation split ({size}images carved from the labelled training images): "
            f"{label}. Test numbers are measured at each trial's last epoch only, never seen by Optuna or "
            "ASHA; the tables give both.")


def write_report(records: list[SearchRecord], out: str | Path, command: str) -> Path:
    """Write README.md, report.html, tables/*.csv, plots and the data/ archive under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(records) == 1:
        archive(records[0], out / "data")
    report = build_report(records, command)
    (out / "README.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report))
    tables = out / "tables"
    if tables.exists():
        shutil.rmtree(tables)
    tables.mkdir()
    for t in report.tables:
        pd.DataFrame(t.rows, columns=t.headers).to_csv(tables / f"{t.name}.csv", index=False)
        (tables / f"{t.name}.tex").write_text(render_latex(t))
    for name, data in {**report.images, **report.vectors}.items():
        (out / name).write_bytes(data)
    return out / "README.md"



def archive(record: SearchRecord, data_dir: Path) -> None:
    """Copy the report's input beside it, so the header's command regenerates it from a clean clone."""
    data_dir.mkdir(parents=True, exist_ok=True)
    record.table.to_parquet(data_dir / RESULTS_FILE, index=False)
    (data_dir / SPACE_FILE).write_text(record.space.model_dump_json(indent=2) + "\n")
    if record.grid_png:
        (data_dir / BEST_GRID_FILE).write_bytes(record.grid_png)
