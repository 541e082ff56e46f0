"""The Tune callback that keeps a search's results table current (see :mod:`mae_search.search.results`).

It turns every trial's per-epoch results into :class:`~mae_search.search.record.TrialRecord`
rows and replaces the Parquet table after every reported epoch (atomic replace),
so a crash or Ctrl-C never loses what finished, and a resumed search appends to
what is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from mae_search.search.record import Status, TrialRecord, epoch_records, status_after
from mae_search.search.results import read_table, trial_error, write_atomic
from mae_search.search.search_dir import SearchDir
from mae_search.storage import Location


class ResultsTableCallback(Callback):
    """Turns every trial's per-epoch results into TrialRecords and keeps the Parquet table current."""

    def __init__(self, search_dir: str | Path | Location | SearchDir, max_epochs: int, space: Any) -> None:
        self.path = SearchDir.at(search_dir).results
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
