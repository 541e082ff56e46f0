"""The typed trial record: the one contract between the search and everything downstream.

A :class:`TrialRecord` is one trial (or reference row) at one epoch: who it is
(search, trial id, seed, searched parameters), the configuration it resolved
to, what it reported, how it ended, and where its checkpoint is. It is built
here, in one place, from Tune's trial config and results; the results table
(results.py) stores its :meth:`~TrialRecord.to_row` form, MLflow
(tracking.py) logs it with the tags of :meth:`~TrialRecord.mlflow_tags`, and the
report (report/) reads the rows back, from the table or through
:func:`row_from_mlflow_tags`. The names shared by those consumers -- result keys,
MLflow tags, statuses -- live here too, so none of them is a bare string agreed on
by convention. The files they live in belong to :mod:`mae_search.search.search_dir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from mae_search.config import TrainConfig

GRID_FILE = "reconstruction.png"  # a trial checkpoint's reconstruction grid
BEST_GRID_FILE = f"best_{GRID_FILE}"  # the best trial's grid, as a report shows and archives it

# MLflow tags (and the one prefix of searched values) that tracking writes and the report reads.
TAG_SEARCH = "mae_search.search"
TAG_KIND = "mae_search.kind"  # "search" on the parent run
TAG_TRIAL_ID = "mae_search.trial_id"
TAG_SEED = "mae_search.seed"
TAG_TUNE_TRIAL = "mae_search.tune_trial_id"  # the configuration's Tune trial, on each seed's run when seed-averaged
TAG_STATUS = "mae_search.status"
TAG_REFERENCE = "mae_search.reference"
TAG_ERROR = "mae_search.error"
TAG_BEST_RUN = "mae_search.best_run_id"
TAG_BEST_TRIAL = "mae_search.best_trial"
TAG_COMMAND = "mae_search.command"  # the command line that ran the search, on the parent run
TAG_STOPPED_BY = "mae_search.stopped_by"
TAG_STOPPED_AT = "mae_search.stopped_at_epoch"
TAG_SEARCHED_PREFIX = "search."
PARAM_PREFIX = "param."  # results-table columns of searched values


class Status(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped_early"  # stopped by the scheduler (ASHA) before the last epoch: not a failure
    FAILED = "failed"
    REFERENCE = "reference"  # a reference row (random-init encoder, raw pixels), not a trial


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A Tune trial config -> (searched parameters, seed)."""
    params = {k: v for k, v in config.items() if k != "seed"}
    return params, int(config.get("seed", 0))


def status_after(last_epoch: int, max_epochs: int) -> Status:
    """How a trial that ended without error ended: all its epochs, or stopped early by the scheduler."""
    return Status.COMPLETED if last_epoch >= max_epochs else Status.STOPPED


# Results-table columns that are not metrics (besides the param.<key> columns).
ROW_FIELDS = frozenset({"search", "trial_id", "tune_trial_id", "status", "error", "seed", "epoch", "config_json",
                        "reference", "trial_time_s", "checkpoint_path", "node_id"})
# Keys Tune adds to every result (and the epoch, which is the step, not a metric).
TUNE_KEYS = frozenset({
    "config", "trial_id", "training_iteration", "done", "date", "hostname", "node_ip", "pid", "time_this_iter_s",
    "time_since_restore", "iterations_since_restore", "timestamp", "checkpoint_dir_name", "experiment_tag",
    "time_total_s", "should_checkpoint", "checkpoint_path", "epoch",
})
PER_SEED_KEY = "per_seed"  # a trial's Tune result: {seed: that seed's metrics} beside the mean over seeds
REPLAYED_KEY = "replayed"  # a per-seed entry re-sent after a restore (the consumers may already hold it)
NODE_KEY = "node_id"  # a seed's report: the Ray node it trained on
FATAL_KEY = "fatal_error"  # a worker's report of an error that a retry would only repeat
REPLAY_KEY = "replayed_history"  # a restored worker's first report: the epochs its checkpoint holds


def present(value: Any) -> bool:
    """A recorded value, not a hole in the table (None, NaN or an empty string)."""
    return value is not None and value == value and value != ""  # NaN is the only value unequal to itself


def text(value: Any) -> str:
    """A string column's value, with the table's holes (None, NaN) read as empty."""
    return str(value) if present(value) else ""


def seed_trial_id(tune_trial_id: str, seed: int, seed_averaged: bool) -> str:
    """A seed's own id: the Tune trial's, or ``<tune trial>-seed<k>`` when one trial trains several seeds."""
    return f"{tune_trial_id}-seed{seed}" if seed_averaged else tune_trial_id


def reference_trial_id(kind: str, seed: int) -> str:
    return f"reference-{kind}-seed{seed}"


@dataclass(frozen=True)
class TrialRecord:
    search: str
    trial_id: str
    seed: int
    params: dict[str, Any]  # searched values as Tune chose them (variant names for variants)
    config: TrainConfig  # what the trial actually ran
    epoch: int = 0  # 0: before the first epoch (a failed start, a reference row)
    metrics: dict[str, float] = field(default_factory=dict)
    status: Status = Status.RUNNING
    error: str = ""
    checkpoint: str = ""
    reference: str = ""  # random_init | raw_pixels for reference rows
    trial_time_s: float | None = None
    tune_trial_id: str = ""  # the Tune trial (one configuration); several seeds share it when seed-averaged
    node_id: str = ""  # the Ray node that trained this epoch (rank 0's); empty for epochs replayed after a restore

    @classmethod
    def for_trial(cls, space: Any, trial_id: str, config: dict[str, Any]) -> list[TrialRecord]:
        """A Tune trial as it starts, one record per seed it trains: identity and resolved configuration
        (the only place a trial's configuration is resolved)."""
        params, _ = split_config(config)
        return [cls(search=space.name, trial_id=seed_trial_id(trial_id, seed, space.seed_averaged), seed=seed,
                    params=params, config=space.trial_config(params, seed), tune_trial_id=trial_id)
                for seed in space.seeds_of_trial(config)]

    def label(self, with_seed: bool = True) -> str:
        """What a researcher reads: the searched values (short keys), then the seed; "base" if none."""
        def value(v: Any) -> str:
            return f"{v:.3g}" if isinstance(v, float) else str(v)

        searched = " ".join(f"{k.rsplit('.', 1)[-1]}={value(v)}" for k, v in sorted(self.params.items()))
        return (searched or "base") + (f" seed={self.seed}" if with_seed else "")

    def at_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: str = "",
                 trial_time_s: float | None = None, node_id: str = "") -> TrialRecord:
        return replace(self, epoch=epoch, metrics=metrics, checkpoint=checkpoint, trial_time_s=trial_time_s,
                       node_id=node_id)

    def ended(self, status: Status, error: str = "") -> TrialRecord:
        return replace(self, status=status, error=error)

    @classmethod
    def reference_row(cls, search: str, kind: str, config: TrainConfig, metrics: dict[str, float]) -> TrialRecord:
        return cls(search=search, trial_id=reference_trial_id(kind, config.seed), seed=config.seed, params={},
                   config=config, metrics=metrics, status=Status.REFERENCE, reference=kind)

    def to_row(self) -> dict[str, Any]:
        """The results-table form (see results.py for the columns)."""
        row: dict[str, Any] = {
            "search": self.search, "trial_id": self.trial_id, "tune_trial_id": self.tune_trial_id,
            "status": str(self.status), "error": self.error,
            "seed": self.seed, "epoch": self.epoch,
            **{f"{PARAM_PREFIX}{k}": v for k, v in self.params.items()},
            **self.metrics,
            "config_json": self.config.model_dump_json(),
        }
        if self.reference:
            row["reference"] = self.reference
        if self.trial_time_s is not None:
            row["trial_time_s"] = self.trial_time_s
        if self.checkpoint or self.status != Status.REFERENCE:
            row["checkpoint_path"] = self.checkpoint
        if self.node_id:
            row["node_id"] = self.node_id
        return row

    def mlflow_tags(self, parent_run_id: str) -> dict[str, str]:
        """The tags of this trial's (or reference row's) MLflow child run: what :func:`row_from_mlflow_tags`
        reads back, so a report rebuilt from MLflow has the table's identity columns."""
        tags = {"mlflow.parentRunId": parent_run_id, TAG_SEARCH: self.search, TAG_TRIAL_ID: self.trial_id,
                TAG_SEED: str(self.seed), TAG_STATUS: str(self.status)}
        if self.tune_trial_id and self.tune_trial_id != self.trial_id:
            tags[TAG_TUNE_TRIAL] = self.tune_trial_id
        if self.reference:
            tags[TAG_REFERENCE] = self.reference
        return tags

    def searched_tags(self) -> dict[str, str]:
        """The searched values as tags (``search.<dotted key>``), read back as ``param.<dotted key>``."""
        return {f"{TAG_SEARCHED_PREFIX}{k}": str(v) for k, v in self.params.items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrialRecord:
        """Back from a results-table row (a resumed search reloads its table this way)."""
        params = {k.removeprefix(PARAM_PREFIX): v for k, v in row.items() if k.startswith(PARAM_PREFIX) and present(v)}
        metrics = {k: float(v) for k, v in row.items()
                   if k not in ROW_FIELDS and not k.startswith(PARAM_PREFIX) and present(v)}
        time_s = row.get("trial_time_s")
        return cls(search=row["search"], trial_id=row["trial_id"], seed=int(row["seed"]), params=params,
                   config=TrainConfig.model_validate(json.loads(row["config_json"])), epoch=int(row["epoch"]),
                   metrics=metrics, status=Status(row["status"]), error=text(row.get("error")),
                   checkpoint=text(row.get("checkpoint_path")), reference=text(row.get("reference")),
                   trial_time_s=float(time_s) if present(time_s) else None,
                   tune_trial_id=text(row.get("tune_trial_id")), node_id=text(row.get("node_id")))


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a reported dict (bools and nested values are not metrics)."""
    return {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def epoch_records(starts: list[TrialRecord], result: dict[str, Any]) -> list[tuple[TrialRecord, bool]]:
    """One Tune result of a trial -> (the record of each seed at that epoch, whether it was replayed).

    ``starts`` are the trial's :meth:`TrialRecord.for_trial` records.
    """
    epoch = int(result.get("epoch", result.get("training_iteration", 0)))
    time_s = float(result.get("time_total_s", 0.0))
    per_seed = result.get(PER_SEED_KEY)
    if per_seed is None and len(starts) == 1:  # a one-seed trial's result is that seed's report
        per_seed = {str(starts[0].seed): result}
    out = []
    for start in starts:
        entry = (per_seed or {}).get(str(start.seed))
        if entry is None:
            continue
        metrics = {k: v for k, v in numbers(entry).items() if k not in TUNE_KEYS}
        replayed = bool(entry.get(REPLAYED_KEY))
        node = "" if replayed else text(entry.get(NODE_KEY))
        out.append((start.at_epoch(epoch, metrics, entry.get("checkpoint_path") or "", time_s, node), replayed))
    return out


def row_from_mlflow_tags(tags: dict[str, str]) -> dict[str, Any]:
    """A child run's tags -> the identity columns of its results-table rows (the inverse of
    :meth:`TrialRecord.mlflow_tags` and :meth:`TrialRecord.searched_tags`)."""
    row: dict[str, Any] = {"search": tags[TAG_SEARCH], "trial_id": tags[TAG_TRIAL_ID],
                           "status": tags.get(TAG_STATUS, str(Status.RUNNING)),
                           "reference": tags.get(TAG_REFERENCE, ""), "seed": int(tags.get(TAG_SEED, 0)),
                           "tune_trial_id": tags.get(TAG_TUNE_TRIAL, "")}
    row.update({f"{PARAM_PREFIX}{k.removeprefix(TAG_SEARCHED_PREFIX)}": _parse_tag(v) for k, v in tags.items()
                if k.startswith(TAG_SEARCHED_PREFIX)})
    return row


def _parse_tag(text: str) -> Any:
    """A searched value logged as a tag string, back to its number (or the string, for a variant name)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
