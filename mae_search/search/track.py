"""MLflow rebuilt from a search's recorded files: the results table is the record, MLflow its mirror.

``mae-search track`` logs a search to MLflow after the fact -- one run with ``--no-mlflow``, one whose
tracking server went away mid-search, one whose driver was killed -- by replaying its results table
through the same :class:`MLflowSearchCallback` a live search uses, synchronously. It is idempotent:
runs are matched by the ids in ``mlflow_runs.json`` (a run that exists is completed, not duplicated),
and an epoch a run already holds is not logged again. Runs the table shows unfinished (the search was
interrupted) end KILLED, never left RUNNING.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mae_search.search.mlflow_runs import MLflowSearchCallback
from mae_search.search.record import Status, TrialRecord
from mae_search.search.results import final_rows, read_results
from mae_search.search.search_dir import SearchDir
from mae_search.search.space import SearchSpace

ENDED = (Status.COMPLETED, Status.STOPPED, Status.FAILED)


@dataclass
class _Trial:
    """What the callback's end-of-search summary reads from a Tune trial."""

    status: str


@dataclass
class Caught:
    parent_run_id: str
    runs: int  # child runs (trials' seeds and reference rows) the search has in MLflow now
    interrupted: int  # trials the table shows unfinished, whose runs were ended KILLED


def lost_tracking(search_dir: SearchDir) -> str | None:
    """Why tracking stopped mid-search, as the search recorded it; None if it did not."""
    state = search_dir.mlflow_state
    return json.loads(state.read_text()).get("lost") if state.is_file() else None


def catch_up(search_dir: SearchDir, uri: str) -> Caught:
    """Bring MLflow (at ``uri``) up to date with the search's results table; returns what it holds."""
    space = SearchSpace.model_validate_json(search_dir.space_file.read_text())
    max_epochs = space.scheduler.max_epochs or space.base.epochs
    tracking = MLflowSearchCallback(uri, space, search_dir, str(search_dir.space_file), max_epochs)
    tracking._setup_parent()  # continues the recorded parent run (same store), else creates it
    table = read_results(search_dir.results) if search_dir.results.is_file() else None
    ends, interrupted = [], 0
    if table is not None and not table.empty:
        for _, row in table.sort_values(["trial_id", "epoch"]).iterrows():
            record = TrialRecord.from_row(row.to_dict())
            if record.epoch > 0:
                tracking._log_epoch(record)
            else:
                tracking._child(record)  # a trial that failed before its first epoch
        for _, row in final_rows(table).iterrows():
            record = TrialRecord.from_row(row.to_dict())
            if record.status == Status.FAILED:
                tracking._end_seed(record, record.error or "trial failed")
            elif record.status in ENDED:
                tracking._end_seed(record, None)
            else:  # still "running" in the table: its search was interrupted or killed
                tracking.client.set_terminated(tracking.children[record.trial_id], "KILLED")
                interrupted += 1
            ends.append(_Trial("TERMINATED" if record.status in ENDED else "RUNNING"))
    planned = space.total_trials() * (space.seeds_per_trial if space.seed_averaged else 1)
    ends += [_Trial("PENDING")] * max(0, planned - len(ends))  # never started: the search is not finished
    tracking._end_parent(ends)
    tracking._save_state()  # without the lost-tracking note: MLflow holds the whole record again
    return Caught(tracking.parent_id, len(tracking.children), interrupted)
