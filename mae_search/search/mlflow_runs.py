"""MLflow tracking: one experiment per search space, a parent run per search, a child run per trial.

Everything is logged from the Tune driver by :class:`MLflowSearchCallback`,
which receives rank 0's metrics of every trial through Tune. So there is
never a run per worker, and trials on remote Ray nodes need no route to the
tracking server: only the driver talks to MLflow. Artifacts are read from the
trial checkpoints in the search's storage.

Tracking is a mirror, not the record: the Parquet table and Ray's storage are
written first and independently. MLflow calls run on a thread of their own,
in order, so Tune's driver never waits on a slow or dead server; HTTP retries
are bounded (:mod:`mae_search.search.tracking`). If MLflow fails mid-search the
callback warns once and stops logging; the search and its results carry on,
and the end of the search waits at most DRAIN_TIMEOUT_S for calls still queued.
"""

from __future__ import annotations

import json
import logging
import queue
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from mae_search.metrics import NAMES, mlflow_key
from mae_search.search.best_encoder import log_best_encoder
from mae_search.search.record import (
    GRID_FILE,
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TAG_COMMAND,
    TAG_ERROR,
    TAG_KIND,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_STOPPED_AT,
    TAG_STOPPED_BY,
    Status,
    TrialRecord,
    epoch_records,
    present,
    status_after,
)
from mae_search.search.results import best_row, final_rows, read_results, reference_rows, trial_error
from mae_search.search.search_dir import SPACE_FILE, SearchDir
from mae_search.search.tracking import active_uri, client, flatten_config, git_commit, versions
from mae_search.storage import Location

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0  # how long the end of a search waits for MLflow calls still queued


class MLflowSearchCallback(Callback):
    """Mirrors a Tune search into MLflow (parent run + nested child run per trial).

    A search always carries one, so tracking can be switched on or moved on resume; with MLflow off
    (``configure_tracking(None)``) it does nothing.

    Why not Ray's ``MLflowLoggerCallback``: it opens one flat run per trial from
    Tune's results, with no parent run for the search, no reference rows, no
    artifacts read from the trials' checkpoints (reconstruction grids, the
    best encoder) and no stopped-early status; it would also log Tune's
    bookkeeping keys as metrics. Its run ids are not kept across a restore
    either: here ``mlflow_runs.json`` beside the results (rather than Tune's
    ``Callback.get_state``, which only a pickled callback carries) lets a
    resumed search, even one restored with another callback object, continue
    the same runs.
    """

    def __init__(self, tracking_uri: str | None, space: Any, search_dir: str | Path | Location | SearchDir,
                 space_file: str | Path, max_epochs: int, grid_epochs: int = 3) -> None:
        self.uri = tracking_uri
        self.space = space
        self.search_dir = SearchDir.at(search_dir)
        self.space_file = str(space_file)
        self.max_epochs = max_epochs
        # Grids at the first, middle and last epoch (plus the final one of a stopped trial).
        self.grid_epochs = {1, max(1, max_epochs // 2), max_epochs} if grid_epochs else set()
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.children: dict[str, str] = {}
        self.last_ckpt: dict[str, tuple[int, str | None]] = {}  # trial id -> (epoch, checkpoint dir)
        self.logged: dict[str, set[int]] = {}  # run id -> epochs it holds (so each is logged once)
        self.disabled = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self.restored = False  # True in the copy Tune restores from the experiment on --resume

    # ----------------------------------------------------------------- safety

    def _safe(self, what: str, fn, *args: Any) -> None:
        """Queue an MLflow call for the tracking thread; Tune's driver thread never waits on MLflow."""
        if self.disabled:
            return
        if self._queue is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name="mlflow-tracking", daemon=True)
            self._thread.start()
        self._queue.put((what, fn, args))

    def _work(self) -> None:
        """The tracking thread: runs the queued calls in order; on a failure warns once and stops tracking."""
        while True:
            what, fn, args = self._queue.get()
            try:
                if not self.disabled:
                    fn(*args)
            except Exception as exc:  # noqa: BLE001 - tracking must not break a search
                self._lost(f"{what} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                log.warning("MLflow %s failed (%s: %s); tracking disabled for the rest of this search, "
                            "results are still written to %s", what, type(exc).__name__, exc, self.search_dir)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait (at most ``timeout_s``) until every queued MLflow call has run; False if some have not."""
        deadline = time.monotonic() + timeout_s
        while self._queue is not None and self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the thread and its queue stay behind, and the copy
        # it restores on --resume knows it is one (so it takes the resumed run's tracking flags).
        return {**self.__dict__, "_queue": None, "_thread": None, "restored": True}

    @property
    def client(self):
        return client(self.uri)

    def _save_state(self, lost: str | None = None) -> None:
        state = {"parent_run_id": self.parent_id, "children": self.children, "tracking_uri": self.uri}
        if lost:
            state["lost"] = lost  # what `mae-search search` reports at its end, and `mae-search track` mends
        self.search_dir.mlflow_state.write_text(json.dumps(state, indent=2))

    def _lost(self, why: str) -> None:
        """Stop tracking and record why in the search's MLflow state (the results table is unaffected)."""
        self.disabled = True
        try:
            self._save_state(lost=why)
        except Exception:  # noqa: BLE001 - the storage failing too is reported by the results table's writer
            log.exception("could not record the tracking failure in %s", self.search_dir.mlflow_state)

    # ----------------------------------------------------------------- parent run

    def setup(self, **info: Any) -> None:
        configured, uri = active_uri()
        if self.restored and configured:
            if uri != self.uri:  # another store than the pickled run's: start its runs afresh
                self.parent_id, self.experiment_id, self.children = None, None, {}
            self.uri = uri
        self.disabled = not self.uri
        if self.disabled:
            return
        self.search_dir.root.mkdir()
        self._safe("setup", self._setup_parent)

    def _experiment_id(self) -> str:
        name = self.space.experiment or self.space.name
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # embedded store: artifacts in the search's storage
            storage = self.search_dir.storage
            location = (str(storage / "mlartifacts" / name) if not storage.is_local else
                        (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri())
        # Tagged as model training, so the MLflow UI opens on its runs table rather than the GenAI views.
        tags = {"mlflow.experimentKind": "custom_model_development"}
        if self.space.description:
            tags["mlflow.note.content"] = self.space.description  # the experiment's description in the UI
        return self.client.create_experiment(name, artifact_location=location, tags=tags)

    def _setup_parent(self) -> None:
        state_file = self.search_dir.mlflow_state
        if state_file.is_file():  # a resumed search continues its runs
            state = json.loads(state_file.read_text())
            if state.get("tracking_uri") == self.uri and state.get("parent_run_id"):
                self.parent_id, self.children = state["parent_run_id"], state.get("children", {})
                self.experiment_id = self.client.get_run(self.parent_id).info.experiment_id
                self.client.update_run(self.parent_id, status="RUNNING")
                self._log_references()
                return
        exp_id = self.experiment_id = self._experiment_id()
        tags = {TAG_SEARCH: self.space.name, TAG_COMMAND: shlex.join(sys.argv),
                "mlflow.source.git.commit": git_commit(), TAG_KIND: "search", **versions()}
        if self.space.description:
            tags["mlflow.note.content"] = self.space.description
        run = self.client.create_run(exp_id, run_name=self.space.name, tags=tags)
        self.parent_id = run.info.run_id
        params = {"space.name": self.space.name, "space.trials": str(self.space.total_trials()),
                  "space.objectives": json.dumps([o.model_dump() for o in self.space.objectives]),
                  "space.scheduler": self.space.scheduler.type, "space.sampler": self.space.sampler}
        self._log_params(self.parent_id, params)
        if Path(self.space_file).is_file():
            self.client.log_artifact(self.parent_id, self.space_file, "search_space")
        with tempfile.TemporaryDirectory() as tmp:  # the validated space, for `mae-search report --mlflow`
            path = Path(tmp) / SPACE_FILE
            path.write_text(self.space.model_dump_json(indent=2))
            self.client.log_artifact(self.parent_id, str(path))
        self._save_state()
        self._log_references()

    def _log_references(self) -> None:
        """Reference rows (random-init encoder, raw pixels) as finished child runs, once each.

        A run is named in the state as soon as it exists: if tracking fails before it is finished (the
        server going away mid-call), the catch-up finishes that run instead of leaving it RUNNING beside
        a second one.
        """
        from mlflow.entities import Metric

        path = self.search_dir.results
        if not path.is_file():
            return
        now = int(time.time() * 1000)
        for row in reference_rows(read_results(path, with_references=True)).to_dict("records"):
            run_id, logged = self.children.get(row["trial_id"]), set()
            if run_id is None:
                record = TrialRecord.from_row(row)
                run_id = self.client.create_run(self.experiment_id, tags=record.mlflow_tags(self.parent_id),
                                                run_name=f"reference: {record.reference} (seed {record.seed})"
                                                ).info.run_id
                self.children[row["trial_id"]] = run_id
            else:
                run = self.client.get_run(run_id)
                if run.info.status == "FINISHED":
                    continue
                logged = set(run.data.metrics)
            metrics = [Metric(mlflow_key(k), float(row[k]), now, 0) for k in NAMES
                       if k in row and present(row[k]) and mlflow_key(k) not in logged]
            self.client.log_batch(run_id, metrics=metrics)
            self.client.set_terminated(run_id, "FINISHED")
        self._save_state()

    # ----------------------------------------------------------------- trials

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _child(self, record: TrialRecord) -> str | None:
        """The child run of one seed of a trial (created on first use)."""
        if record.trial_id in self.children or self.parent_id is None:
            return self.children.get(record.trial_id)
        cfg = record.config
        run = self.client.create_run(self.experiment_id, run_name=record.label()[:250],
                                     tags=record.mlflow_tags(self.parent_id))
        run_id = run.info.run_id
        self.children[record.trial_id] = run_id
        self.logged[run_id] = set()
        self._log_params(run_id, flatten_config(cfg))
        searched = record.searched_tags()
        if searched:
            self.client.log_batch(run_id, tags=[_tag(k, v) for k, v in searched.items()])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.json"
            path.write_text(cfg.model_dump_json(indent=2))
            self.client.log_artifact(run_id, str(path))
        self._save_state()
        return run_id

    def _seeds(self, trial: Any) -> list[TrialRecord]:
        return TrialRecord.for_trial(self.space, trial.trial_id, dict(trial.config))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for record in self._seeds(trial):
            self._safe("trial start", self._child, record)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for record, _ in epoch_records(self._seeds(trial), result):
            self._safe("metrics", self._log_epoch, record)

    def _log_epoch(self, record: TrialRecord) -> None:
        """One seed's epoch, logged once: an epoch re-sent after a restore (replayed, or trained again
        from an older checkpoint) is skipped when the run already holds it."""
        from mlflow.entities import Metric

        run_id = self._child(record)
        epoch = record.epoch
        if epoch >= self.last_ckpt.get(record.trial_id, (0, None))[0]:  # how the trial ended, logged or not
            self.last_ckpt[record.trial_id] = (epoch, record.checkpoint or None)
        if run_id not in self.logged:  # a run continued from before a resume: ask MLflow once
            history = self.client.get_metric_history(run_id, mlflow_key("trial_time_s"))  # logged every epoch
            self.logged[run_id] = {m.step for m in history}
        if epoch in self.logged[run_id]:
            return
        self.logged[run_id].add(epoch)
        now = int(time.time() * 1000)
        values = {**record.metrics, "trial_time_s": float(record.trial_time_s or 0.0)}
        metrics = [Metric(mlflow_key(k), float(v), now, epoch) for k, v in values.items()]
        self.client.log_batch(run_id, metrics=metrics)
        ckpt = record.checkpoint
        if ckpt and epoch in self.grid_epochs and (Location.of(ckpt) / GRID_FILE).is_file():
            self._log_grid(run_id, Location.of(ckpt) / GRID_FILE, epoch)

    def _log_grid(self, run_id: str, grid: Location, epoch: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / f"epoch_{epoch:03d}.png"
            named.write_bytes(grid.read_bytes())
            self.client.log_artifact(run_id, str(named), "reconstruction")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for record in self._seeds(trial):
            self._safe("trial end", self._end_seed, record, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for record in self._seeds(trial):
            self._safe("trial error", self._end_seed, record, trial_error(trial, 4000))

    def _end_seed(self, record: TrialRecord, error: str | None) -> None:
        run_id = self._child(record)
        epoch, ckpt = self.last_ckpt.get(record.trial_id, (0, None))
        if error is not None:
            self.client.set_tag(run_id, TAG_STATUS, str(Status.FAILED))
            self.client.set_tag(run_id, TAG_ERROR, error)
            self.client.set_terminated(run_id, "FAILED")
            return
        status = status_after(epoch, self.max_epochs)
        self.client.set_tag(run_id, TAG_STATUS, str(status))
        if status == Status.STOPPED:
            self.client.set_tag(run_id, TAG_STOPPED_BY, "ASHA")
            self.client.set_tag(run_id, TAG_STOPPED_AT, str(epoch))
        if ckpt and epoch not in self.grid_epochs and (Location.of(ckpt) / GRID_FILE).is_file():
            self._log_grid(run_id, Location.of(ckpt) / GRID_FILE, epoch)
        # Stopped early by ASHA is a normal end (its status tag says so); only an error is FAILED.
        self.client.set_terminated(run_id, "FINISHED")

    # ----------------------------------------------------------------- end of search

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._safe("search end", self._end_parent, trials)
        if not self.flush():
            self._lost(f"the server did not answer within {DRAIN_TIMEOUT_S:.0f} s at the end of the search")
            log.warning("MLflow did not answer within %.0f s at the end of the search; what was not logged yet "
                        "is in %s (a --resume logs the rest)", DRAIN_TIMEOUT_S, self.search_dir)

    def _end_parent(self, trials: list) -> None:
        """Best config and metric, the results table and the best encoder, from the recorded table.

        The table (not this callback's memory) is used so a resumed search's
        summary covers the trials finished before the interruption too.
        """
        if self.parent_id is None:
            return
        finished = all(t.status in ("TERMINATED", "ERROR") for t in trials)
        table = self.search_dir.results
        if table.is_file():
            with table.as_local_file() as local:
                self.client.log_artifact(self.parent_id, str(local))
            best = best_row(final_rows(read_results(table)), self.space.primary.metric, self.space.primary.mode)
            if best is not None:
                self._log_best(best)
        self.client.set_terminated(self.parent_id, "FINISHED" if finished else "KILLED")

    def _log_best(self, row: Any) -> None:
        obj = self.space.primary
        trial_id = row["trial_id"]
        run_id = self.children.get(trial_id, "")
        tags = [_tag(TAG_BEST_TRIAL, trial_id), _tag(TAG_BEST_RUN, run_id)]
        tags += [_tag(f"best.{k.removeprefix('param.')}", str(row[k])) for k in row.index if k.startswith("param.")]
        best = mlflow_key(obj.metric).replace("/", "/best_")  # e.g. eval/best_linear_probe_acc
        logged = self.client.get_run(self.parent_id).data
        if logged.tags.get(TAG_BEST_TRIAL) == trial_id and logged.metrics.get(best) == float(row[obj.metric]):
            return  # a resumed or caught-up search whose best is already logged: nothing twice
        self.client.log_batch(self.parent_id, metrics=[_metric(best, row[obj.metric])], tags=tags)
        log_best_encoder(self.client, self.parent_id, self.children.get(trial_id), row.get("checkpoint_path") or "")


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value[:5000])


def _metric(key: str, value: float, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)
