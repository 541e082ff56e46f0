"""A report's input: one search's space and trials table, from its results.parquet or its MLflow experiment.

Both sources give the same columns (:func:`normalise`), so both give the same report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mae_search.metrics import SELECTABLE, from_mlflow_key
from mae_search.report.labels import (
    METRICS,
)
from mae_search.search.record import (
    BEST_GRID_FILE,
    GRID_FILE,
    TAG_BEST_RUN,
    TAG_KIND,
    Status,
    row_from_mlflow_tags,
)
from mae_search.search.results import best_row, final_rows, read_table, results_file
from mae_search.search.search_dir import SPACE_FILE
from mae_search.search.space import SearchSpace
from mae_search.storage import Location


class ReportError(ValueError):
    """The report cannot be built from what was given; one line."""



@dataclass
class SearchRecord:
    """One search's space and trials table (columns shared by the Parquet and MLflow sources)."""

    space: SearchSpace
    table: pd.DataFrame
    grid_png: bytes | None = None



def load_from_dir(path: str | Path | Location) -> SearchRecord:
    """A search directory (results.parquet + search_space.json), or a report's data/ archive; a local
    path or an object-store URI."""
    table_file = results_file(path)
    space_file = table_file.parent / SPACE_FILE
    if not table_file.is_file():
        raise ReportError(f"unknown search: no results table at {table_file}")
    if not space_file.is_file():
        raise ReportError(f"{space_file}: missing (the search's space is needed to lay out the report)")
    space = _read_space(space_file.read_text(), str(space_file))
    try:
        raw = read_table(table_file)
        table = normalise(raw)
    except Exception as exc:  # noqa: BLE001 - a damaged table is reported, not traced back
        raise ReportError(f"{table_file}: cannot read results table ({type(exc).__name__}: {exc})") from None
    grid = table_file.parent / BEST_GRID_FILE  # a report's data/ archive
    png = grid.read_bytes() if grid.is_file() else _best_grid_from_checkpoint(raw, space)
    return SearchRecord(space, table, png)



def _read_space(text: str, source: str) -> SearchSpace:
    from pydantic import ValidationError

    from mae_search.config import describe_validation_error

    try:
        space = SearchSpace.model_validate_json(text)
    except ValidationError as exc:
        raise ReportError(describe_validation_error(exc, source)) from None
    if space.select_on == "val" and space.primary.metric in SELECTABLE:
        space.select_on = "test"  # recorded before searches had a validation split: they selected on test
    return space



def _best_grid_from_checkpoint(table: pd.DataFrame, space: SearchSpace) -> bytes | None:
    best = best_row(completed_final(table), space.primary.metric, space.primary.mode)
    if best is None or "checkpoint_path" not in best or not best["checkpoint_path"]:
        return None
    png = Location.of(best["checkpoint_path"]) / GRID_FILE
    return png.read_bytes() if png.is_file() else None



def load_from_mlflow(experiment: str, tracking_uri: str) -> SearchRecord:
    """Rebuild the trials table from an MLflow experiment's parent and child runs."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"unknown search: no MLflow experiment '{experiment}' at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], max_results=10_000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "search"]
    if not parents:
        raise ReportError(f"MLflow experiment '{experiment}' holds no mae-search search")
    parent = parents[-1]
    with tempfile.TemporaryDirectory() as tmp:
        space_path = client.download_artifacts(parent.info.run_id, SPACE_FILE, tmp)
        space = _read_space(Path(space_path).read_text(), f"MLflow run {parent.info.run_id}")
    records = []
    for run in runs:
        tags = run.data.tags
        if tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        base = row_from_mlflow_tags(tags)
        by_epoch: dict[int, dict[str, Any]] = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                by_epoch.setdefault(m.step, {})[from_mlflow_key(key)] = m.value
        if not by_epoch:
            records.append({**base, "epoch": 0})
        for epoch, metrics in sorted(by_epoch.items()):
            records.append({**base, "epoch": epoch, **metrics})
    png = None
    best_run = parent.data.tags.get(TAG_BEST_RUN)
    if best_run:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = Path(client.download_artifacts(best_run, "reconstruction", tmp))
                last = sorted(folder.glob("*.png"))
                png = last[-1].read_bytes() if last else None
            except Exception:  # noqa: BLE001 - a report without the grid is still a report
                png = None
    return SearchRecord(space, normalise(pd.DataFrame.from_records(records)), png)



def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the columns both sources share, in one order and dtype, sorted by trial and epoch."""
    params = sorted(c for c in df.columns if c.startswith("param."))
    metrics = [m.name for m in METRICS if m.name in df.columns]
    extra = [c for c in ("mask_ratio", "trial_time_s") if c in df.columns]
    cols = ["search", "trial_id", "tune_trial_id", "status", "reference", "seed", "epoch", *params, *metrics, *extra]
    out = df[[c for c in cols if c in df.columns]].copy()
    # The configuration a row belongs to: its Tune trial, shared by the seeds of a seed-averaged trial.
    tune_ids = out["tune_trial_id"].fillna("").astype(str) if "tune_trial_id" in out else out["trial_id"]
    out["tune_trial_id"] = tune_ids.where(tune_ids != "", out["trial_id"])
    if "reference" in out:
        out["reference"] = out["reference"].fillna("").astype(str)
    out["seed"] = out["seed"].astype(int)
    out["epoch"] = out["epoch"].astype(int)
    for c in metrics + extra:
        out[c] = out[c].astype(float)
    return out.sort_values(["search", "trial_id", "epoch"]).reset_index(drop=True)



def completed_final(table: pd.DataFrame) -> pd.DataFrame:
    final = final_rows(table)
    return final[final["status"] == Status.COMPLETED].reset_index(drop=True)


def best_trial_target(record: SearchRecord) -> str | None:
    """The reconstruction target of the trial whose grid the report shows (the best completed one): its
    dimension value where the search varies it, the space's base setting otherwise."""
    best = best_row(completed_final(record.table), record.space.primary.metric, record.space.primary.mode)
    if best is None:
        return None
    varied = best.get("param.loss.target")
    return varied if isinstance(varied, str) else record.space.base.loss.target
