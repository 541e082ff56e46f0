"""MLflow tracking: one experiment per search space, a parent run per search, a child run per trial.

Everything is logged from the Tune driver by :class:`MLflowSearchCallback`,
which receives rank 0's metrics of every trial through Tune. So there is
never a run per worker, and trials on remote Ray nodes need no route to the
tracking server: only the driver talks to MLflow. Artifacts are read from the
trial checkpoints in the search's storage.

Tracking is a mirror, not the record: the Parquet table and Ray's storage are
written first and independently. MLflow calls run on a thread of their own,
in order, so Tune's driver never waits on a slow or dead server; HTTP retries
are bounded. If MLflow fails mid-search the callback warns once and stops
logging; the search and its results carry on, and the end of the search waits
at most DRAIN_TIMEOUT_S for calls still queued. A tracking server that cannot
be reached is reported before the search starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from ray.tune import Callback

from mae_search.config import TrainConfig
from mae_search.metrics import mlflow_key
from mae_search.record import (
    GRID_FILE,
    TAG_BEST_RUN,
    TAG_ERROR,
    TAG_KIND,
    TAG_REFERENCE,
    TAG_SEARCH,
    TAG_SEARCHED_PREFIX,
    TAG_SEED,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TAG_TUNE_TRIAL,
    Status,
    TrialRecord,
    epoch_records,
    status_after,
)
from mae_search.record import MLFLOW_STATE_FILE as STATE_FILE
from mae_search.storage import Location, mlflow_db

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0  # how long the end of a search waits for MLflow calls still queued
# MLflow's own defaults retry a dead server for about 4 minutes per call (7 retries with backoff, 120 s
# timeouts). Bounded here, unless the user set them: a tracking server that went away costs seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(ValueError):
    """MLflow cannot be used as configured; one line naming the URI."""


def default_tracking_uri(storage: str | Path | Location) -> str:
    """The embedded store: a SQLite file beside the search results (no server needed), or in the local
    mirror of an object store (SQLite needs a local disk; its artifacts still go to the object store)."""
    return f"sqlite:///{mlflow_db(Location.of(storage))}"


def resolve_tracking_uri(cli_uri: str | None, storage: str | Path | Location) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded store under ``storage``."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage)


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not after an hour of training) if the tracking store is unusable."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason})") from None
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme and scheme not in KNOWN_SCHEMES:
        raise TrackingError(f"MLflow tracking URI {uri}: unknown scheme '{scheme}' (MLflow takes "
                            f"{', '.join(sorted(KNOWN_SCHEMES))})")
    if scheme and scheme not in ("sqlite", "file"):
        return  # databases and databricks are checked by the first client call
    local = Path(uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:"))
    if not local.parent.is_dir():  # MLflow would create the directories of a mistyped path
        problem = "is not a directory" if local.parent.exists() else "does not exist"
        raise TrackingError(f"MLflow tracking store {uri}: {local.parent} {problem}")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unusable
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({type(exc).__name__}: {exc})") from None


KNOWN_SCHEMES = frozenset({"http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks",
                           "databricks-uc", "uc"})


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten_config(cfg: TrainConfig) -> dict[str, str]:
    """Dotted keys -> strings, the form MLflow params take."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("mae-search", "torch", "torchvision", "ray", "optuna", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[f"version.{pkg}"] = metadata.version(pkg)
    return out


# The tracking store of the driver process now running, set by the CLI before each run (None: MLflow off).
# Tune pickles its callbacks with the experiment and restores them on --resume; reading the store from
# here at setup (not from the pickled instance) makes --tracking-uri and --no-mlflow given on resume
# take effect.
_ACTIVE = {"configured": False, "uri": None}


def configure_tracking(uri: str | None) -> None:
    """Where this driver process logs (None: not at all); read by every MLflowSearchCallback at setup."""
    _ACTIVE.update(configured=True, uri=uri)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


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

    def __init__(self, tracking_uri: str | None, space: Any, search_dir: str | Path | Location,
                 space_file: str | Path, max_epochs: int, grid_epochs: int = 3) -> None:
        self.uri = tracking_uri
        self.space = space
        self.search_dir = Location.of(search_dir)
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
                self.disabled = True
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
        return _client(self.uri)

    def _save_state(self) -> None:
        state = {"parent_run_id": self.parent_id, "children": self.children, "tracking_uri": self.uri}
        (self.search_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # ----------------------------------------------------------------- parent run

    def setup(self, **info: Any) -> None:
        if self.restored and _ACTIVE["configured"]:
            if _ACTIVE["uri"] != self.uri:  # another store than the pickled run's: start its runs afresh
                self.parent_id, self.experiment_id, self.children = None, None, {}
            self.uri = _ACTIVE["uri"]
        self.disabled = not self.uri
        if self.disabled:
            return
        self.search_dir.mkdir()
        self._safe("setup", self._setup_parent)

    def _experiment_id(self) -> str:
        name = self.space.experiment or self.space.name
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # embedded store: artifacts in the search's storage
            storage = self.search_dir.parent
            location = (str(storage / "mlartifacts" / name) if not storage.is_local else
                        (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri())
        # Tagged as model training, so the MLflow UI opens on its runs table rather than the GenAI views.
        tags = {"mlflow.experimentKind": "custom_model_development"}
        if self.space.description:
            tags["mlflow.note.content"] = self.space.description  # the experiment's description in the UI
        return self.client.create_experiment(name, artifact_location=location, tags=tags)

    def _setup_parent(self) -> None:
        state_file = self.search_dir / STATE_FILE
        if state_file.is_file():  # a resumed search continues its runs
            state = json.loads(state_file.read_text())
            if state.get("tracking_uri") == self.uri and state.get("parent_run_id"):
                self.parent_id, self.children = state["parent_run_id"], state.get("children", {})
                self.experiment_id = self.client.get_run(self.parent_id).info.experiment_id
                self.client.update_run(self.parent_id, status="RUNNING")
                self._log_references()
                return
        exp_id = self.experiment_id = self._experiment_id()
        tags = {TAG_SEARCH: self.space.name, "mae_search.command": shlex.join(sys.argv),
                "mlflow.source.git.commit": _git_commit(), TAG_KIND: "search", **_versions()}
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
            path = Path(tmp) / "search_space.json"
            path.write_text(self.space.model_dump_json(indent=2))
            self.client.log_artifact(self.parent_id, str(path))
        self._save_state()
        self._log_references()

    def _log_references(self) -> None:
        """Reference rows (random-init encoder, raw pixels) as finished child runs, once each."""
        from mae_search.metrics import NAMES
        from mae_search.results import RESULTS_FILE, read_results, reference_rows

        path = self.search_dir / RESULTS_FILE
        if not path.is_file():
            return
        now = int(time.time() * 1000)
        for _, row in reference_rows(read_results(path, with_references=True)).iterrows():
            if row["trial_id"] in self.children:
                continue
            tags = {"mlflow.parentRunId": self.parent_id, TAG_SEARCH: self.space.name,
                    TAG_TRIAL_ID: row["trial_id"], TAG_SEED: str(int(row["seed"])),
                    TAG_STATUS: str(Status.REFERENCE), TAG_REFERENCE: row["reference"]}
            run = self.client.create_run(self.experiment_id, tags=tags,
                                         run_name=f"reference: {row['reference']} (seed {int(row['seed'])})")
            from mlflow.entities import Metric

            metrics = [Metric(mlflow_key(k), float(row[k]), now, 0) for k in NAMES if k in row and pd_notna(row[k])]
            self.client.log_batch(run.info.run_id, metrics=metrics)
            self.client.set_terminated(run.info.run_id, "FINISHED")
            self.children[row["trial_id"]] = run.info.run_id
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
        tags = {"mlflow.parentRunId": self.parent_id, TAG_SEARCH: record.search, TAG_TRIAL_ID: record.trial_id,
                TAG_SEED: str(record.seed), TAG_STATUS: str(Status.RUNNING)}
        if record.tune_trial_id and record.tune_trial_id != record.trial_id:
            tags[TAG_TUNE_TRIAL] = record.tune_trial_id
        run = self.client.create_run(self.experiment_id, run_name=record.label()[:250], tags=tags)
        run_id = run.info.run_id
        self.children[record.trial_id] = run_id
        self.logged[run_id] = set()
        self._log_params(run_id, flatten_config(cfg))
        searched = {f"{TAG_SEARCHED_PREFIX}{k}": str(v) for k, v in record.params.items()}
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
        if run_id not in self.logged:  # a run continued from before a resume: ask MLflow once
            history = self.client.get_metric_history(run_id, mlflow_key("epoch_time_s"))
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
        if epoch >= self.last_ckpt.get(record.trial_id, (0, None))[0]:
            self.last_ckpt[record.trial_id] = (epoch, ckpt or None)

    def _log_grid(self, run_id: str, grid: Location, epoch: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / f"epoch_{epoch:03d}.png"
            named.write_bytes(grid.read_bytes())
            self.client.log_artifact(run_id, str(named), "reconstruction")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for record in self._seeds(trial):
            self._safe("trial end", self._end_seed, record, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from mae_search.results import trial_error

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
            self.client.set_tag(run_id, "mae_search.stopped_by", "ASHA")
            self.client.set_tag(run_id, "mae_search.stopped_at_epoch", str(epoch))
        if ckpt and epoch not in self.grid_epochs and (Location.of(ckpt) / GRID_FILE).is_file():
            self._log_grid(run_id, Location.of(ckpt) / GRID_FILE, epoch)
        # Stopped early by ASHA is a normal end (its status tag says so); only an error is FAILED.
        self.client.set_terminated(run_id, "FINISHED")

    # ----------------------------------------------------------------- end of search

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._safe("search end", self._end_parent, trials)
        if not self.flush():
            self.disabled = True
            log.warning("MLflow did not answer within %.0f s at the end of the search; what was not logged yet "
                        "is in %s (a --resume logs the rest)", DRAIN_TIMEOUT_S, self.search_dir)

    def _end_parent(self, trials: list) -> None:
        """Best config and metric, the results table and the best encoder, from the recorded table.

        The table (not this callback's memory) is used so a resumed search's
        summary covers the trials finished before the interruption too.
        """
        if self.parent_id is None:
            return
        from mae_search.results import RESULTS_FILE, best_row, final_rows, read_results

        finished = all(t.status in ("TERMINATED", "ERROR") for t in trials)
        table = self.search_dir / RESULTS_FILE
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
        tags = [_tag("mae_search.best_trial", trial_id), _tag(TAG_BEST_RUN, run_id)]
        tags += [_tag(f"best.{k.removeprefix('param.')}", str(row[k])) for k in row.index if k.startswith("param.")]
        best = mlflow_key(obj.metric).replace("/", "/best_")  # e.g. eval/best_linear_probe_acc
        self.client.log_batch(self.parent_id, metrics=[_metric(best, row[obj.metric])], tags=tags)
        self._log_encoder(trial_id, row.get("checkpoint_path") or "")

    def _log_encoder(self, trial_id: str, ckpt: str) -> None:
        """The best trial's encoder weights + config, loadable with :func:`load_encoder`."""
        from mae_search.checkpoint import CHECKPOINT_FILE, load_checkpoint
        from mae_search.model import MaskedAutoencoderViT, encoder_state_dict

        if not ckpt or not (Location.of(ckpt) / CHECKPOINT_FILE).is_file():
            return
        state = load_checkpoint(Location.of(ckpt) / CHECKPOINT_FILE)
        cfg = TrainConfig.model_validate(state["config"])
        model = MaskedAutoencoderViT(cfg.model)
        model.load_state_dict(state["model"])
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(encoder_state_dict(model), Path(tmp) / "encoder.pt")
            (Path(tmp) / "config.json").write_text(cfg.model_dump_json(indent=2))
            for name in ("encoder.pt", "config.json"):
                self.client.log_artifact(self.parent_id, str(Path(tmp) / name), "best_encoder")
                if trial_id in self.children:
                    self.client.log_artifact(self.children[trial_id], str(Path(tmp) / name), "encoder")
        self._log_encoder_model(model, cfg)

    def _log_encoder_model(self, model: Any, cfg: TrainConfig) -> None:
        """The best encoder as an MLflow model (``runs:/<parent run>/encoder``): images in, tokens out,
        exported with torch.export, so ``mlflow.pytorch.load_model`` needs neither this project nor its
        code to load it. Saved locally and logged as the run's artifacts through this callback's client:
        no global MLflow state (``mlflow.set_tracking_uri`` would leak into the rest of the process)."""
        import mlflow.pytorch

        from mae_search.model import MAEEncoder

        encoder = MAEEncoder(model).eval()
        example = torch.rand(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
        with tempfile.TemporaryDirectory() as tmp:
            # Requirements given, not inferred: inference re-imports everything in a subprocess (tens of s).
            mlflow.pytorch.save_model(encoder, Path(tmp) / "encoder", input_example=example.numpy(),
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            self.client.log_artifacts(self.parent_id, str(Path(tmp) / "encoder"), "encoder")


def pd_notna(value: Any) -> bool:
    return value is not None and value == value  # NaN is the only value unequal to itself


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value[:5000])


def _metric(key: str, value: float, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def load_encoder(run_id: str, tracking_uri: str, artifact_path: str = "best_encoder"):
    """Load a logged encoder back into a MaskedAutoencoderViT (decoder freshly initialised).

    Use the search's parent run with ``best_encoder`` or a trial's run with
    ``encoder``; the result is ready for probing or fine-tuning.
    """
    from mae_search.model import MaskedAutoencoderViT

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(_client(tracking_uri).download_artifacts(run_id, artifact_path, tmp))
        cfg = TrainConfig.model_validate_json((local / "config.json").read_text())
        model = MaskedAutoencoderViT(cfg.model)
        missing, unexpected = model.load_state_dict(torch.load(local / "encoder.pt", map_location="cpu"),
                                                    strict=False)
    if unexpected or any(not k.startswith(("decoder", "mask_token")) for k in missing):
        raise TrackingError(f"run {run_id}: encoder weights do not fit the logged config")
    return model, cfg
