"""Ray wiring of a search: Tune with Optuna and ASHA, the cluster's plan, resume checks, references.

Each Tune trial runs :func:`mae_search.trial.run_trial`, which trains its
configuration once per seed: as a Ray task when a seed has one worker, or as a
Ray Train ``TorchTrainer`` (DDP) when it has several. Ray 2.60 uses Train V2,
where a Trainer cannot be handed to a Tuner, so the trial builds it and calls
``fit()``. The seeds' epochs reach Tune as their mean, so Optuna sees them and
ASHA can stop the trial between epochs.

Layout under ``<storage>/<search name>/``: Tune's experiment state, one
``train_runs/<trial id>/`` per trial and seed (checkpoints; a lost worker
restarts from there, and a resumed search's unfinished trial too, because the
directory is named by trial and seed), and ``results.parquet``. The storage
is a local directory or an object store (:mod:`mae_search.storage`); the Optuna
study, a SQLite file, lives in the storage's local mirror and is copied beside
the rest after every trial.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from mae_search.config import ConfigError
from mae_search.data import DataError
from mae_search.evaluate import REFERENCE_KINDS
from mae_search.results import RESULTS_FILE, SPACE_FILE, missing_references, record_references
from mae_search.search_space import SearchSpace
from mae_search.seed_run import reference_task
from mae_search.storage import OPTUNA_DB, Location, optuna_db, restore_sqlite_copies, save_sqlite_copies
from mae_search.trial import run_trial

# Ray's switch for its single-machine mode (see loopback_node).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# The Tune-side driver of a trial only waits on its seeds' runs. It takes no
# CPU (Tune refuses an empty bundle, so it holds a token 1 MB of memory), which
# leaves every CPU to the training workers (see plan_concurrency), and it runs on
# the head node, beside the search's driver: losing a worker node then costs the
# seeds that trained there (Ray retries them from their checkpoints), never a
# trial's driver and its queue.
HEAD_NODE_RESOURCE = "node:__internal_head__"
DRIVER_BUNDLE = {"memory": 1024 * 1024, HEAD_NODE_RESOURCE: 0.001}


# --------------------------------------------------------------------------- reference rows


def run_references(space: SearchSpace, search_dir: Location) -> int:
    """Evaluate the reference rows the results table lacks (every seed x kind), concurrently; returns how many.

    They run before the trials, with one trial-worker's resources each, and are
    recorded once: a resumed search reuses them.
    """
    todo = missing_references(search_dir, space.seeds, REFERENCE_KINDS)
    if not todo:
        return 0
    res = space.resources
    task = ray.remote(reference_task).options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)
    configs = {seed: space.base.with_overrides({"seed": seed}) for seed, _ in todo}
    futures = [task.remote(configs[seed].model_dump(mode="json"), kind, res.cpus_per_worker) for seed, kind in todo]
    try:
        results = ray.get(futures)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, ConfigError | DataError):  # every trial would fail the same way: stop here
            raise ConfigError(f"search '{space.name}': on the cluster, {cause}") from None
        raise
    rows = [(kind, configs[seed], metrics) for (seed, kind), metrics in zip(todo, results, strict=True)]
    record_references(search_dir, space.name, rows)
    return len(todo)


# --------------------------------------------------------------------------- trial driver




# --------------------------------------------------------------------------- search driver


def param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune search space: grid ablations use grid_search (every value), otherwise Tune domains for Optuna."""
    out: dict[str, Any] = {}
    for key, dim in space.dimensions.items():
        kind = dim.kind
        if kind in ("grid", "variants"):
            out[key] = tune.grid_search(dim.values) if space.is_grid else tune.choice(dim.values)
        elif kind == "choice":
            out[key] = tune.choice(dim.choice)
        elif kind == "uniform":
            out[key] = tune.uniform(*dim.uniform)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*dim.loguniform)
        else:
            out[key] = tune.randint(dim.int[0], dim.int[1] + 1)
    seed_grid = space.is_grid and len(space.seeds) > 1 and not space.seed_averaged
    out["seed"] = tune.grid_search(space.seeds) if seed_grid else space.seeds[0]
    return out


OPTUNA_FILE = OPTUNA_DB  # the persisted Optuna study, beside the results table


def optuna_file(search_dir: str | Path | Location) -> Path:
    """The Optuna study's SQLite file: in the search directory, or in its local mirror for an object store."""
    search_dir = Location.of(search_dir)
    return optuna_db(search_dir.parent, search_dir.name)


def optuna_storage_url(search_dir: str | Path | Location) -> str:
    """Where a search's Optuna study lives: open it with ``optuna-dashboard URL`` or ``optuna.load_study``."""
    return f"sqlite:///{optuna_file(search_dir)}"


class SQLiteCopies(tune.Callback):
    """With an object store as storage, copies the SQLite files (Optuna study, embedded MLflow store)
    there after every trial and at the end, so a search resumed on another machine continues them
    (:func:`mae_search.storage.save_sqlite_copies`). Runs after the tracking callback, which has
    flushed its MLflow calls by the end of the search."""

    def __init__(self, storage: Location, search: str) -> None:
        self.storage, self.search = storage, search

    def _copy(self) -> None:
        save_sqlite_copies(self.storage, self.search)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._copy()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._copy()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._copy()




def make_sampler(space: SearchSpace) -> Any:
    """The file's Optuna sampler, seeded with the search's first seed."""
    import optuna

    seed = space.seeds[0]
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }
    return samplers[space.sampler]()


def make_searcher(space: SearchSpace, search_dir: str | Path | Location) -> Any:
    """OptunaSearch with the file's sampler (multi-objective when several objectives are given).

    The study is persisted in ``<search dir>/optuna.db`` under the search's name
    (Ray keeps Optuna's studies in memory by default), so optuna-dashboard and
    ``optuna.load_study`` open a running or finished search, and a resumed
    search continues the sampler's history from it.
    """
    if space.is_grid:
        return None
    import optuna
    from optuna.storages import RDBStorage
    from ray.tune.search.optuna import OptunaSearch

    optuna_file(search_dir).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study/trial on the terminal
    common = dict(sampler=make_sampler(space), points_to_evaluate=space.initial_points or None,
                  study_name=space.name, storage=RDBStorage(optuna_storage_url(search_dir)))
    objectives = space.objectives
    if len(objectives) == 1:
        return OptunaSearch(**common)  # metric/mode come from TuneConfig for a single objective.
    return OptunaSearch(**common, metric=[o.metric for o in objectives], mode=[o.mode for o in objectives])


ASHA_FILE = "asha_rungs.json"  # ASHA's rungs, so a resumed search continues them


class PersistentASHA(ASHAScheduler):
    """ASHA whose rungs survive a resume.

    Tune saves the searcher's state with the experiment but not the
    scheduler's: a restored search would start ASHA with empty rungs, so the
    trials before the fault would no longer count towards any cutoff. This
    writes the rungs (milestone -> {trial id: value}) to JSON after every
    decision and reads them back when the search starts again. It keys
    progress on the reported ``epoch``, not Tune's ``training_iteration``,
    which restarts at 1 for a trial restored from its Train checkpoint.
    """

    def __init__(self, state_file: str | Path | Location, **kwargs: Any) -> None:
        super().__init__(time_attr="epoch", **kwargs)
        self.state_file = Location.of(state_file)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        ok = super().set_search_properties(metric, mode, **spec)
        path = self.state_file
        if path.is_file():
            state = json.loads(path.read_text())
            for bracket, rungs in zip(self._brackets, state["brackets"], strict=True):
                bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
            self._num_stopped = state["num_stopped"]
        return ok

    def rung_counts(self) -> list[dict[int, int]]:
        """Per bracket, how many trials each rung has recorded (what a resumed search must keep)."""
        return [{milestone: len(recorded) for milestone, recorded in b._rungs} for b in self._brackets]

    def _save(self) -> None:
        state = {"brackets": [[[m, r] for m, r in b._rungs] for b in self._brackets],
                 "num_stopped": self._num_stopped}
        self.state_file.write_text(json.dumps(state))  # replaced whole

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def make_scheduler(space: SearchSpace, epochs: int, search_dir: str | Path | Location) -> Any:
    if space.scheduler.type == "none":
        return None
    s = space.scheduler
    return PersistentASHA(  # metric/mode come from TuneConfig
        Location.of(search_dir) / ASHA_FILE,
        max_t=s.max_epochs or epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


@dataclass
class ClusterPlan:
    """How many trials can run at once without any of them waiting forever for its workers."""

    concurrency: int
    cpus: float
    gpus: float
    parallel_seeds: int = 1  # seeds of one seed-averaged trial that train at once


def plan_concurrency(space: SearchSpace, cluster: dict[str, float]) -> ClusterPlan:
    """Cap concurrent trials by what the cluster can actually hold.

    Each seed reserves ``workers x (cpus, gpus)``: in the trial's placement
    group when it trains as a Ray task, in a placement group of its own when it
    trains as a Ray Train run; the Tune-side driver of a trial takes no CPU.
    Letting Tune start more trials than fit makes the extra Train worker groups
    wait until Train's start-up timeout, which on a 2-core laptop looks like a
    hang.
    """
    res = space.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    need_cpu = res.workers * res.cpus_per_worker
    need_gpu = res.workers * res.gpus_per_worker
    fits = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu > 0:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"search '{space.name}': a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU "
            f"but the cluster has {cpus:g} CPU and {gpus:g} GPU (lower resources: in the space file, or join a "
            f"larger cluster with --address)"
        )
    # A seed-averaged trial trains its seeds side by side when they fit, else in turns; trials share the rest.
    parallel_seeds = min(space.seeds_per_trial, fits)
    concurrency = min(space.max_concurrent_trials, max(1, fits // parallel_seeds))
    return ClusterPlan(concurrency=concurrency, cpus=cpus, gpus=gpus, parallel_seeds=parallel_seeds)


def local_resources(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray instance started here will have, known before it starts (for plan_concurrency)."""
    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def init_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Join ``address`` (``auto``, ``ray://host:10001``; else ``RAY_ADDRESS``), or start a local instance.

    A local instance listens on loopback only; other interfaces belong to a cluster that is joined.
    Returns a one-line description of the cluster for the user.
    """
    if ray.is_initialized():
        return describe_cluster("Ray")
    address = address or os.environ.get("RAY_ADDRESS")  # where ray.init would go too (a Ray job sets it)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers' output (Ray Train's per-report lines, controller notices) stays in Ray's log files.
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard process also serves the State API, which Train V2's
        # placement-group cleaner needs to notice a finished trial.
        with loopback_node():
            ray.init(num_cpus=num_cpus, **kwargs)
    return describe_cluster(f"Ray: joined the cluster at {address}" if address else "Ray: started a local instance")


@contextmanager
def loopback_node() -> Iterator[None]:
    """While a local Ray instance starts inside, give its node the address 127.0.0.1.

    Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, every worker) to all interfaces
    unless the node's address is 127.0.0.1, and on Linux it takes that address from the route
    out: ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into it. Ray's single-machine
    mode, the default on macOS and Windows and switched by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    uses 127.0.0.1. The processes ``ray.init`` starts inherit the variable; the driver read it at
    import, so its copy is set too. Both are put back afterwards, so a later ``--address`` join in
    the same process is unaffected. Token authentication stays on as well
    (tests/test_ray_security.py checks both).
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(LOCAL_ONLY_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env


def describe_cluster(prefix: str) -> str:
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return f"{prefix} ({nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)"


def trainable_for(space: SearchSpace, storage: Location, plan: ClusterPlan) -> Any:
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
        tune.with_parameters(run_trial, space=space, storage=storage, parallel_seeds=plan.parallel_seeds),
        resources,
    )


def build_tuner(space: SearchSpace, storage: Location, callbacks: list[Any], plan: ClusterPlan) -> tune.Tuner:
    trainable = trainable_for(space, storage, plan)
    base = space.base
    single = len(space.objectives) == 1
    return tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=space.primary.metric if single else None,
            mode=space.primary.mode if single else None,
            search_alg=make_searcher(space, storage / space.name),
            scheduler=make_scheduler(space, base.epochs, storage / space.name),
            num_samples=space.num_samples,
            max_concurrent_trials=plan.concurrency,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=str(storage),  # a path or a URI, which Ray resolves as storage.Location does
            callbacks=[*callbacks, SQLiteCopies(storage, space.name)],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,  # the project's own view (progress.py) replaces Tune's reporter and result dumps
        ),
    )


PLAN_FILE = "plan.json"  # the concurrency a search was planned with


def first_difference(recorded: Any, given: Any, prefix: str = "") -> str | None:
    """The first dotted key where two JSON-like values differ, shown with both values; None if equal."""
    if isinstance(recorded, dict) and isinstance(given, dict):
        for key in sorted(set(recorded) | set(given)):
            found = first_difference(recorded.get(key), given.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if recorded == given else f"{prefix[:-1]} (recorded {recorded!r}, now {given!r})"


def check_tune_state(space: SearchSpace, exp_dir: Location) -> None:
    """Refuse to resume from a damaged Tune experiment state: Tune would start a new, empty experiment
    (trials without their config) and report success. The results table is untouched either way."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        raise ConfigError(f"search '{space.name}': no Tune experiment state under {exp_dir}, nothing to resume")
    for state in states:
        try:
            trials = json.loads(state.read_text()).get("trial_data")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            trials, reason = None, f"{type(exc).__name__}: {str(exc)[:120]}"
        else:
            reason = "no trial data"
        if not isinstance(trials, list):
            raise ConfigError(f"search '{space.name}': Tune's experiment state {state} is damaged ({reason}); the "
                              f"finished trials are kept in {exp_dir / RESULTS_FILE}; start a new search (another "
                              f"name or --storage) to run the rest")


def check_search_dir(space: SearchSpace, storage: str | Path | Location, resume: bool) -> None:
    """What the search directory alone decides, checked before Ray starts: a new search must not
    overwrite a recorded one; a resumed one must have an intact record matching this configuration."""
    exp_dir = Location.of(storage) / space.name
    if not resume:
        if exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(
                f"search '{space.name}' already exists under {exp_dir}: use --resume, or another --storage"
            )
        return
    if not tune.Tuner.can_restore(str(exp_dir)):
        raise ConfigError(f"search '{space.name}': nothing to resume under {exp_dir}")
    check_tune_state(space, exp_dir)
    check_resumable(space, exp_dir)


def check_resumable(space: SearchSpace, exp_dir: Location, plan: ClusterPlan | None = None) -> str | None:
    """--resume continues exactly the recorded search: refuse, in one line, anything that would mix
    configurations (a changed file or --set) or, given the cluster's plan, hang it (a cluster too
    small for its concurrent trials). Returns a line for the user when the cluster could hold more
    concurrent trials than recorded."""
    record = exp_dir / SPACE_FILE
    if not record.is_file():
        raise ConfigError(f"search '{space.name}': {record} is missing, so there is no record to resume")
    recorded = json.loads(record.read_text())
    diff = first_difference(recorded, json.loads(space.model_dump_json()))
    if diff:
        raise ConfigError(f"search '{space.name}': --resume continues the recorded configuration ({record}), "
                          f"but the space file and --set now differ at {diff}; resume without changes, or start "
                          f"a new search (another name or --storage)")
    if plan is None:
        return None
    plan_file = exp_dir / PLAN_FILE
    planned = json.loads(plan_file.read_text())["concurrency"] if plan_file.is_file() else 1
    if plan.concurrency < planned:
        raise ConfigError(f"search '{space.name}' runs {planned} trials at once, but this cluster holds "
                          f"{plan.concurrency} ({plan.cpus:g} CPU, {plan.gpus:g} GPU): resume on a cluster that "
                          f"holds {planned}")
    if plan.concurrency > planned:
        # Tune restores its concurrency limit with the experiment's searcher state; raising it would
        # mean editing Tune's pickled state, so the resumed search keeps the recorded limit and says so.
        return (f"resuming with {planned} concurrent trial(s) as recorded; this cluster could hold "
                f"{plan.concurrency} (a new search would use them)")
    return None


def run_search(
    space: SearchSpace,
    storage: str | Path | Location,
    *,
    address: str | None = None,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    num_cpus: int | None = None,
    notify: Any = print,
) -> tuple[tune.ResultGrid, float]:
    """Run (or resume) a search to completion; returns Tune's ResultGrid and the wall time in seconds."""
    storage = Location.of(storage)
    exp_dir = storage / space.name
    # Epochs without an evaluation report no probe metric. Tune would reject those results; ASHA, which
    # reads the metric every epoch, is refused by validation unless eval.every_epochs is 1.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's newer console output prints its own header and a TensorBoard hint even when silent; the legacy
    # one at verbose=0 prints nothing, leaving the terminal to the project's view (progress.py).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    check_search_dir(space, storage, resume)
    restore_sqlite_copies(storage, space.name)  # the CLI has done it before opening MLflow's store
    init_ray(address, num_cpus)
    plan = plan_concurrency(space, ray.cluster_resources())
    started = time.time()
    if resume:
        note = check_resumable(space, exp_dir, plan)
        if note:
            notify(note)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable_for(space, storage, plan), resume_errored=True)
    else:
        tuner = build_tuner(space, storage, callbacks or [], plan)
        exp_dir.mkdir()
        (exp_dir / ASHA_FILE).unlink()  # rungs of an earlier attempt that never started Tune
        (exp_dir / SPACE_FILE).write_text(space.model_dump_json(indent=2))  # the record --resume checks against
        (exp_dir / PLAN_FILE).write_text(json.dumps({"concurrency": plan.concurrency}))
    run_references(space, exp_dir)
    grid = tuner.fit()
    return grid, time.time() - started
