"""The search results table: one row per trial-epoch, in ``<search dir>/results.parquet``.

Each row is a :class:`~mae_search.record.TrialRecord` in its ``to_row`` form,
written by a Tune callback on the driver after every reported epoch (atomic
replace), so a crash or Ctrl-C never loses what finished, and a resumed search
appends to what is there. This table is the input of the report generator.

Columns: search, trial_id, status (running | completed | stopped_early |
failed | reference), error, seed, epoch, ``param.<dotted key>`` for each
searched dimension, every reported metric, reference (random_init |
raw_pixels on reference rows), trial_time_s, checkpoint_path, node_id, config_json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mae_search.search.record import Status, TrialRecord
from mae_search.search.search_dir import RESULTS_FILE, SearchDir
from mae_search.search.space import SearchSpace
from mae_search.storage import Location

# Kept as names for the modules that compare table columns with them.



def read_table(path: Path | Location) -> pd.DataFrame:
    """A Parquet table read in one go: the file's bytes first, so a table replaced while it is read (the
    results callback rewrites it after every epoch, the tracking thread reads it) is never seen half old."""
    return pd.read_parquet(Location.of(path).open_input())


def results_file(path: str | Path | Location) -> Location:
    """A results table given as itself or as the search directory (or report archive) holding it."""
    path = Location.of(path)
    return path / RESULTS_FILE if path.is_dir() or not path.name.endswith(".parquet") else path


def read_results(path: str | Path | Location, with_references: bool = False) -> pd.DataFrame:
    """Load a results table (a file, or a search directory holding one; local or in an object store):
    the trials' rows, and the reference rows too when asked."""
    path = results_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results table")
    df = read_table(path)
    if with_references or "status" not in df:
        return df
    return df[df["status"] != Status.REFERENCE].reset_index(drop=True)


def write_atomic(df: pd.DataFrame, path: Location) -> None:
    """Replace the table whole (a reader never sees half of it)."""
    path.write_bytes(df.to_parquet(index=False))


def trial_error(trial: Any, limit: int) -> str:
    """The last line of a failed trial's error file (the exception), or a generic phrase."""
    if trial.error_file and Path(trial.error_file).is_file():
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:limit]
    return "trial failed"


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last reported epoch of each trial (what a table of final metrics shows); reference rows excluded."""
    if "status" in df:
        df = df[df["status"] != Status.REFERENCE]
    trial = ["search", "trial_id"] if "search" in df else ["trial_id"]  # combined searches may share ids
    return df.sort_values([*trial, "epoch"]).groupby(trial, sort=False).tail(1).reset_index(drop=True)


def by_configuration(final: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Final rows -> one row per Tune trial (a configuration): the metric's mean and std over its seeds,
    ``seeds`` counting them, ``trial_id`` the Tune trial's. Tables of a search without seed-averaged trials
    come back one row per trial, as they were (``seeds`` = 1)."""
    df = final.copy()
    if "tune_trial_id" in df:
        df["tune_trial_id"] = df["tune_trial_id"].where(df["tune_trial_id"].fillna("") != "", df["trial_id"])
    else:
        df["tune_trial_id"] = df["trial_id"]
    groups = df.groupby("tune_trial_id", sort=False)
    out = groups.head(1).set_index("tune_trial_id")
    out["seeds"] = groups.size()
    if metric in df:
        out[metric] = groups[metric].mean()
        out[f"{metric}_std"] = groups[metric].std()
    out["epoch"] = groups["epoch"].max()
    return out.reset_index(drop=False).assign(trial_id=lambda d: d["tune_trial_id"])


def reference_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The reference rows of a results table (empty when the search recorded none)."""
    if "status" not in df:
        return df.iloc[0:0]
    return df[df["status"] == Status.REFERENCE].reset_index(drop=True)


def missing_references(search_dir: SearchDir, seeds: list[int], kinds: tuple[str, ...]) -> list[tuple[int, str]]:
    """(seed, kind) pairs the search's table has no reference row for yet."""
    path = search_dir.results
    have = set()
    if path.is_file():
        refs = reference_rows(read_results(path, with_references=True))
        have = {(int(r["seed"]), r["reference"]) for _, r in refs.iterrows()}
    return [(seed, kind) for seed in seeds for kind in kinds if (seed, kind) not in have]


def record_references(search_dir: str | Path | Location | SearchDir,
                      rows: list[tuple[str, Any, dict[str, float]]]) -> None:
    """Append reference rows (kind, TrainConfig with the seed, metrics) to the search's table (atomic replace)."""
    search_dir = SearchDir.at(search_dir)
    path = search_dir.results
    new = pd.DataFrame.from_records([TrialRecord.reference_row(search_dir.name, kind, cfg, metrics).to_row()
                                     for kind, cfg, metrics in rows])
    old = read_table(path) if path.is_file() else None
    write_atomic(new if old is None else pd.concat([old, new], ignore_index=True), path)


def best_row(final: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """Row of the best final metric among trials that reported it (None if none did)."""
    if metric not in final or final[metric].isna().all():
        return None
    return final.loc[final[metric].idxmax() if mode == "max" else final[metric].idxmin()]


def search_summary(search_dir: SearchDir) -> dict[str, Any]:
    """Name, planned trials, trial counts by status and best final metric of a search directory (for
    ``mae-search list``); a search that has not reported yet has zero counts. Counted per configuration."""
    space = SearchSpace.model_validate_json(search_dir.space_file.read_text())
    metric, mode = space.primary.metric, space.primary.mode
    counts: dict[str, int] = {}
    best = None
    if search_dir.results.is_file():
        final = final_rows(read_results(search_dir.results))
        if not final.empty:
            trials = by_configuration(final, metric)
            counts = trials["status"].value_counts().to_dict()
            best = best_row(trials, metric, mode)
    return {"name": space.name, "planned": space.total_trials(), "counts": counts, "metric": metric,
            "mode": mode, "best": best}
