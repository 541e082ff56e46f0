"""Running a search: pre-flight checks, tracking, Ray, Tune with Optuna and ASHA, the reference rows.

Each Tune trial runs :func:`mae_search.search.trial.run_trial`, which trains its
configuration once per seed: as a Ray task when a seed has one worker, or as a
Ray Train ``TorchTrainer`` (DDP) when it has several. Ray 2.60 uses Train V2,
where a Trainer cannot be handed to a Tuner, so the trial builds it and calls
``fit()``. The seeds' epochs reach Tune as their mean, so Optuna sees them and
ASHA can stop the trial between epochs.

Every file a search writes is named by :class:`~mae_search.search.search_dir.SearchDir`:
Tune's experiment state, one ``train_runs/<trial id>/`` per trial and seed
(checkpoints; a lost worker restarts from there, and a resumed search's
unfinished trial too, because the directory is named by trial and seed), and
``results.parquet``. The storage is a local directory or an object store
(:mod:`mae_search.storage`); the SQLite files live in its local mirror and are
copied beside the rest after every trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from rich.console import Console

from mae_search.config import ConfigError
from mae_search.data.load import DataError, check_local_data
from mae_search.search.cluster import (
    DRIVER_BUNDLE,
    ClusterPlan,
    init_ray,
    local_resources,
    log_ray_to,
    plan_concurrency,
)
from mae_search.search.interrupt import PreTrialInterrupts
from mae_search.search.mlflow_runs import MLflowSearchCallback
from mae_search.search.progress import SearchProgress, stop_progress
from mae_search.search.record import Status
from mae_search.search.reference_store import ReferenceStore
from mae_search.search.results import by_configuration, final_rows, missing_references, read_results, record_references
from mae_search.search.results_callback import ResultsTableCallback
from mae_search.search.resume import check_resumable, check_search_dir
from mae_search.search.search_dir import SearchDir
from mae_search.search.seed_run import reference_task
from mae_search.search.space import SearchSpace
from mae_search.search.strategy import make_scheduler, make_searcher, param_space
from mae_search.search.tracking import check_tracking, configure_tracking, default_tracking_uri, resolve_tracking_uri
from mae_search.search.trial import run_trial
from mae_search.storage import Location, check_writable
from mae_search.training.evaluate import REFERENCE_KINDS


@dataclass
class SearchOutcome:
    """How a search ended: its directory, wall time, and each configuration's final row."""

    search_dir: SearchDir
    wall_s: float
    trials: pd.DataFrame | None  # one row per configuration (a seed-averaged trial once); None: nothing reported
    planned: int

    @property
    def failed(self) -> int:
        return int((self.trials["status"] == Status.FAILED).sum())

    @property
    def unfinished(self) -> int:
        """Configurations cut off mid-way or never started."""
        ended = self.trials["status"].isin([Status.COMPLETED, Status.STOPPED, Status.FAILED]).sum()
        return self.planned - int(ended)


def run_search(space: SearchSpace, storage: str | Path | Location, *, space_file: str | Path,
               address: str | None = None, resume: bool = False, num_cpus: int | None = None,
               tracking_uri: str | None = None, mlflow: bool = True, fresh_references: bool = False,
               console: Console | None = None) -> SearchOutcome:
    """What ``mae-search search`` does: every check that needs no Ray first (data, storage, tracking,
    the search directory, whether a local instance can hold a trial), then Ray and the search, with the
    results table, MLflow and the live progress view as Tune callbacks."""
    console = console or Console()
    search_dir = SearchDir.of(storage, space.name)
    if address is None:  # on a cluster the path need only exist on the workers' nodes
        check_local_data(space.base.data)
    check_writable(search_dir.storage)
    search_dir.restore_sqlite_copies()  # a search resumed on another machine: before they are opened
    uri = resolve_tracking_uri(tracking_uri, search_dir.storage) if mlflow else None
    if uri and uri == default_tracking_uri(search_dir.storage):
        search_dir.mlflow_db.parent.mkdir(parents=True, exist_ok=True)  # where the embedded store lives
    if uri:
        check_tracking(uri)
    check_search_dir(space, search_dir, resume)
    if address is None:  # a local instance's size is known now: refuse a trial it cannot hold
        plan_concurrency(space, local_resources(num_cpus))
    # Every check passed: a refused search prints its one error line and nothing before it.
    if uri:
        console.print(f"MLflow: {uri} (experiment '{space.experiment or space.name}')")
    configure_tracking(uri)  # also what a resumed search's restored callback logs to
    max_epochs = space.scheduler.max_epochs or space.base.epochs
    callbacks = [ResultsTableCallback(search_dir, max_epochs, space),
                 MLflowSearchCallback(uri, space, search_dir, space_file, max_epochs),
                 SearchProgress(space, max_epochs, console, search_dir)]
    with PreTrialInterrupts() as interrupts:  # one guard from here to the first trial: no Ctrl-C is lost
        console.print(f"search [bold]{space.name}[/]: {plan_sentence(space)}, results in {search_dir}")
        ray_log = log_ray_to(search_dir.driver_log)
        with interrupts.deferred():
            console.print(init_ray(address, num_cpus))
        console.print(f"logs: Ray's driver messages in {ray_log}, its workers' in Ray's session logs "
                      "(ray/session_latest/logs under the temp directory of each node)", highlight=False)
        started = time.time()
        tuner = prepare_tuner(space, search_dir, interrupts, resume=resume, callbacks=callbacks,
                              fresh_references=fresh_references,
                              notify=lambda line: console.print(line, highlight=False))
    try:
        tuner.fit()
    finally:
        stop_progress()
    return outcome(space, search_dir, time.time() - started)


def plan_sentence(space: SearchSpace) -> str:
    """What the search will run, in words: a space without dimensions runs its base configuration."""
    trials = space.total_trials()
    how = f"{'grid' if space.is_grid else 'optuna/' + space.sampler}, scheduler {space.scheduler.type}"
    what = f"{trials} trial{'s' if trials != 1 else ''} ({how})"
    if not space.dimensions:
        what += " of the base configuration (the space has no dimensions)"
    return what


def outcome(space: SearchSpace, search_dir: SearchDir, wall_s: float) -> SearchOutcome:
    if not search_dir.results.is_file():
        return SearchOutcome(search_dir, wall_s, None, space.total_trials())
    trials = by_configuration(final_rows(read_results(search_dir.results)), space.primary.metric)
    return SearchOutcome(search_dir, wall_s, trials, space.total_trials())


def tune_search(space: SearchSpace, search_dir: str | Path | Location | SearchDir, *, resume: bool = False,
                callbacks: list[Any] | None = None, address: str | None = None, num_cpus: int | None = None,
                fresh_references: bool = False, notify: Callable[[str], None] = print) -> float:
    """Run (or resume) the Tune part of a search on Ray (started or joined if it is not yet), after the
    checks of :func:`run_search`; returns the wall time in seconds."""
    with PreTrialInterrupts() as interrupts:
        with interrupts.deferred():
            init_ray(address, num_cpus)
        started = time.time()
        tuner = prepare_tuner(space, SearchDir.at(search_dir), interrupts, resume=resume, callbacks=callbacks,
                              fresh_references=fresh_references, notify=notify)
    tuner.fit()
    return time.time() - started


def prepare_tuner(space: SearchSpace, search_dir: SearchDir, interrupts: PreTrialInterrupts, *, resume: bool,
                  callbacks: list[Any] | None, fresh_references: bool,
                  notify: Callable[[str], None]) -> tune.Tuner:
    """Everything before the trials, on a started Ray: the Tuner (restored or new, its record written) and
    the reference rows. Runs inside the caller's ``interrupts`` guard; Tune's own handler takes over in fit()."""
    # Epochs without an evaluation report no probe metric. Tune would reject those results; ASHA, which
    # reads the metric every epoch, is refused by validation unless eval.every_epochs is 1.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's newer console output prints its own header and a TensorBoard hint even when silent; the legacy
    # one at verbose=0 prints nothing, leaving the terminal to the project's view (progress.py).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    plan = plan_concurrency(space, ray.cluster_resources())
    if resume and search_dir.tune_started:
        note = check_resumable(space, search_dir, plan)
        if note:
            notify(note)
        tuner = tune.Tuner.restore(str(search_dir.root), trainable=trainable_for(space, search_dir, plan),
                                   resume_errored=True)
    else:  # a new search, or one interrupted before its first trial (its reference rows are kept)
        tuner = build_tuner(space, search_dir, callbacks or [], plan)
        search_dir.root.mkdir()
        search_dir.asha_file.unlink()  # rungs of an earlier attempt that never started Tune
        search_dir.space_file.write_text(space.model_dump_json(indent=2))  # the record --resume checks
        search_dir.plan_file.write_text(json.dumps({"concurrency": plan.concurrency}))
    interrupts.check()
    run_references(space, search_dir, interrupts.check, fresh=fresh_references, notify=notify)
    return tuner


def run_references(space: SearchSpace, search_dir: SearchDir, check_interrupt: Callable[[], None] = lambda: None,
                   poll_s: float = 0.5, fresh: bool = False, notify: Callable[[str], None] = print) -> int:
    """Record the reference rows the results table lacks (every seed x kind); returns how many.

    Rows another search under the same storage root computed from the same
    inputs are read from its :class:`ReferenceStore` (``fresh`` computes them
    anyway); the rest run before the trials, concurrently, with one
    trial-worker's resources each, and are stored there for the next search.
    They are recorded once: a resumed search reuses them. The wait polls, asking
    ``check_interrupt`` between polls, so a Ctrl-C stops it even when Ray's
    client code swallowed the ``KeyboardInterrupt`` (:mod:`~mae_search.search.interrupt`);
    the unfinished tasks are cancelled then.
    """
    todo = missing_references(search_dir, space.seeds, REFERENCE_KINDS)
    if not todo:
        return 0
    store = ReferenceStore(search_dir.storage, gpu=space.resources.gpus_per_worker > 0)
    configs = {seed: space.base.with_overrides({"seed": seed}) for seed, _ in todo}
    stored = {} if fresh else {(seed, kind): store.get(configs[seed], kind) for seed, kind in todo}
    reused = {key: row for key, row in stored.items() if row is not None}
    if reused:
        by = sorted({row.search for row in reused.values()})
        notify(f"reference rows: {len(reused)} of {len(todo)} read from {store.root} (computed by "
               f"{', '.join(by)}; --fresh-references computes them again)")
    computed = compute_references(space, [key for key in todo if key not in reused], configs, check_interrupt,
                                  poll_s)
    for (seed, kind), metrics in computed.items():
        store.put(configs[seed], kind, metrics, space.name)
    metrics = {**{key: row.metrics for key, row in reused.items()}, **computed}
    record_references(search_dir, [(kind, configs[seed], metrics[seed, kind]) for seed, kind in todo])
    return len(todo)


def compute_references(space: SearchSpace, todo: list[tuple[int, str]], configs: dict[int, Any],
                       check_interrupt: Callable[[], None], poll_s: float) -> dict[tuple[int, str], dict[str, float]]:
    """The reference rows ``todo`` (seed, kind), each a Ray task with one trial-worker's resources."""
    if not todo:
        return {}
    res = space.resources
    task = ray.remote(reference_task).options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)
    futures = [task.remote(configs[seed].model_dump(mode="json"), kind, res.cpus_per_worker) for seed, kind in todo]
    try:
        pending = futures
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            check_interrupt()
        results = ray.get(futures)
    except KeyboardInterrupt:
        for future in futures:  # their rows would not be recorded: stop them now
            with contextlib.suppress(Exception):  # one already gone must not hide the interrupt
                ray.cancel(future, force=True)
        raise
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, ConfigError | DataError):  # every trial would fail the same way: stop here
            raise ConfigError(f"search '{space.name}': on the cluster, {cause}") from None
        raise
    return dict(zip(todo, results, strict=True))


class SQLiteCopies(tune.Callback):
    """With an object store as storage, copies the SQLite files (Optuna study, embedded MLflow store)
    there after every trial and at the end, so a search resumed on another machine continues them
    (:meth:`SearchDir.save_sqlite_copies`). Runs after the tracking callback, which has flushed its
    MLflow calls by the end of the search."""

    def __init__(self, search_dir: SearchDir) -> None:
        self.search_dir = search_dir

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.search_dir.save_sqlite_copies()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.search_dir.save_sqlite_copies()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.search_dir.save_sqlite_copies()


def trainable_for(space: SearchSpace, search_dir: SearchDir, plan: ClusterPlan) -> Any:
    """The Tune trainable, bound to the space and this cluster's plan (rebuilt on resume, so re-planned).

    With Ray tasks as runners, the trial reserves its seeds' CPUs and GPUs in its own placement group
    (the tasks it starts are scheduled into it), so Tune counts them and starts no trial that could
    not get its workers; a Ray Train run reserves its workers in a placement group of its own.
    """
    res = space.resources
    bundles = [DRIVER_BUNDLE]
    if not res.uses_ray_train:
        bundles += [{"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}] * plan.parallel_seeds
    resources = tune.PlacementGroupFactory(bundles)
    return tune.with_resources(
        tune.with_parameters(run_trial, space=space, search_dir=search_dir, parallel_seeds=plan.parallel_seeds),
        resources,
    )


def build_tuner(space: SearchSpace, search_dir: SearchDir, callbacks: list[Any], plan: ClusterPlan) -> tune.Tuner:
    single = len(space.objectives) == 1
    return tune.Tuner(
        trainable_for(space, search_dir, plan),
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=space.primary.metric if single else None,
            mode=space.primary.mode if single else None,
            search_alg=make_searcher(space, search_dir),
            scheduler=make_scheduler(space, space.base.epochs, search_dir),
            num_samples=space.num_samples,
            max_concurrent_trials=plan.concurrency,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=str(search_dir.storage),  # a path or a URI, which Ray resolves as storage.Location does
            callbacks=[*callbacks, SQLiteCopies(search_dir)],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,  # the project's own view (progress.py) replaces Tune's reporter and result dumps
        ),
    )
