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
from ray.tune import Callback

from mae_search.record import RESULTS_FILE, SPACE_FILE, TUNE_KEYS, Status, TrialRecord, epoch_records, status_after
from mae_search.search_space import SearchSpace
from mae_search.storage import Location

# Kept as names for the modules that compare table columns with them.
STATUS_RUNNING, STATUS_COMPLETED, STATUS_STOPPED, STATUS_FAILED, STATUS_REFERENCE = (
    Status.RUNNING.value, Status.COMPLETED.value, Status.STOPPED.value, Status.FAILED.value, Status.REFERENCE.value)
def reported_metrics(result: dict[str, Any]) -> dict[str, int | float]:
    """The numbers the trainer reported in a Tune result, without Tune's bookkeeping."""
    return {k: v for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, int | float) and not isinstance(v, bool)}


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
    return df[df["status"] != STATUS_REFERENCE].reset_index(drop=True)


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
        df = df[df["status"] != STATUS_REFERENCE]
    return df.sort_values(["trial_id", "epoch"]).groupby("trial_id", sort=False).tail(1).reset_index(drop=True)


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
    return df[df["status"] == STATUS_REFERENCE].reset_index(drop=True)


def missing_references(search_dir: Location, seeds: list[int], kinds: tuple[str, ...]) -> list[tuple[int, str]]:
    """(seed, kind) pairs the search's table has no reference row for yet."""
    path = Location.of(search_dir) / RESULTS_FILE
    have = set()
    if path.is_file():
        refs = reference_rows(read_results(path, with_references=True))
        have = {(int(r["seed"]), r["reference"]) for _, r in refs.iterrows()}
    return [(seed, kind) for seed in seeds for kind in kinds if (seed, kind) not in have]


def record_references(search_dir: Location, search: str, rows: list[tuple[str, Any, dict[str, float]]]) -> None:
    """Append reference rows (kind, TrainConfig with the seed, metrics) to the search's table (atomic replace)."""
    path = Location.of(search_dir) / RESULTS_FILE
    new = pd.DataFrame.from_records([TrialRecord.reference_row(search, kind, cfg, metrics).to_row()
                                     for kind, cfg, metrics in rows])
    old = read_table(path) if path.is_file() else None
    write_atomic(new if old is None else pd.concat([old, new], ignore_index=True), path)


def best_row(final: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """Row of the best final metric among trials that reported it (None if none did)."""
    if metric not in final or final[metric].isna().all():
        return None
    return final.loc[final[metric].idxmax() if mode == "max" else final[metric].idxmin()]


class ResultsTableCallback(Callback):
    """Turns every trial's per-epoch results into TrialRecords and keeps the Parquet table current."""

    def __init__(self, search_dir: str | Path | Location, search_name: str, max_epochs: int, space: Any) -> None:
        self.path = Location.of(search_dir) / RESULTS_FILE
        self.search = search_name
        self.max_epochs = max_epochs
        self.space = space
        self.records: dict[tuple[str, int], TrialRecord] = {}
        self.started: dict[str, list[TrialRecord]] = {}  # Tune trial id -> its seeds' records before any epoch

    def setup(self, **info: Any) -> None:
        self.path.parent.mkdir()
        if self.path.is_file():  # reference rows, and a resumed search's earlier trials
            for row in read_table(self.path).to_dict("records"):
                record = TrialRecord.from_row(row)
                self.records[(record.trial_id, record.epoch)] = record

    def _start(self, trial: Any) -> list[TrialRecord]:
        if trial.trial_id not in self.started:
            self.started[trial.trial_id] = TrialRecord.for_trial(self.space, trial.trial_id, dict(trial.config))
        return self.started[trial.trial_id]

    def _trial_records(self, trial: Any) -> list[tuple[tuple[str, int], TrialRecord]]:
        """Every recorded epoch of every seed of a Tune trial."""
        ids = {r.trial_id for r in self._start(trial)}
        return [(key, r) for key, r in self.records.items() if key[0] in ids]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for record, _ in epoch_records(self._start(trial), result):
            key = (record.trial_id, record.epoch)
            known = self.records.get(key)
            if known is not None and not record.checkpoint:  # a replayed epoch keeps the checkpoint it had
                record = record.at_epoch(record.epoch, record.metrics, known.checkpoint, record.trial_time_s)
            self.records[key] = record
        self._write()

    def _end(self, trial: Any, status: Status, error: str = "") -> None:
        for key, record in self._trial_records(trial):
            self.records[key] = record.ended(status, error)
        self._write()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = max((key[1] for key, _ in self._trial_records(trial)), default=0)
        self._end(trial, status_after(last, self.max_epochs))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for start in self._start(trial):  # a seed that failed before its first epoch still gets a row
            if not any(key[0] == start.trial_id for key, _ in self._trial_records(trial)):
                self.records[(start.trial_id, 0)] = start
        self._end(trial, Status.FAILED, trial_error(trial, 500))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write()

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame.from_records([r.to_row() for _, r in sorted(self.records.items())])
        if not df.empty:
            front = ["search", "trial_id", "tune_trial_id", "status", "error", "seed", "epoch"]
            df = df[front + [c for c in df.columns if c not in front]]
        return df

    def _write(self) -> None:
        df = self.table()
        if not df.empty:
            write_atomic(df, self.path)


def search_summary(search_dir: Location) -> dict[str, Any]:
    """Name, planned trials, trial counts by status and best final metric of a search directory (for
    ``mae-search list``); a search that has not reported yet has zero counts. Counted per configuration."""
    space = SearchSpace.model_validate_json((search_dir / SPACE_FILE).read_text())
    metric, mode = space.primary.metric, space.primary.mode
    counts: dict[str, int] = {}
    best = None
    if (search_dir / RESULTS_FILE).is_file():
        final = final_rows(read_results(search_dir))
        if not final.empty:
            trials = by_configuration(final, metric)
            counts = trials["status"].value_counts().to_dict()
            best = best_row(trials, metric, mode)
    return {"name": space.name, "planned": space.total_trials(), "counts": counts, "metric": metric,
            "mode": mode, "best": best}
