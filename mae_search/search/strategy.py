"""How a search explores and prunes: the Tune search space, Optuna's sampler, and ASHA.

The Optuna study is persisted in the search's ``optuna.db`` (Ray keeps Optuna's
studies in memory by default), and ASHA's rungs in ``asha_rungs.json`` (Tune saves
the searcher's state with the experiment but not the scheduler's), so a resumed
search continues both. A new sampler or scheduler is a value in
:mod:`mae_search.search.space` and a constructor here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from mae_search.search.search_dir import SearchDir
from mae_search.search.space import SearchSpace
from mae_search.storage import Location


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



def optuna_storage_url(search_dir: str | Path | Location | SearchDir) -> str:
    """Where a search's Optuna study lives: open it with ``optuna-dashboard URL`` or ``optuna.load_study``."""
    return SearchDir.at(search_dir).optuna_url


def make_sampler(space: SearchSpace) -> Any:
    """The file's Optuna sampler, seeded with the search's first seed."""
    import optuna

    seed = space.seeds[0]
    startup = {} if space.startup_trials is None else {"n_startup_trials": space.startup_trials}
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, **startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, **startup),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, **startup),
    }
    return samplers[space.sampler]()


def make_searcher(space: SearchSpace, search_dir: str | Path | Location | SearchDir) -> Any:
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
    search_dir = SearchDir.at(search_dir)
    search_dir.optuna_db.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study/trial on the terminal
    common = dict(sampler=make_sampler(space), points_to_evaluate=space.initial_points or None,
                  study_name=space.name, storage=RDBStorage(search_dir.optuna_url))
    objectives = space.objectives
    if len(objectives) == 1:
        return EvaluatedEpochsOptuna(**common)  # metric/mode come from TuneConfig for a single objective.
    return EvaluatedEpochsOptuna(**common, metric=[o.metric for o in objectives], mode=[o.mode for o in objectives])


class EvaluatedEpochsOptuna(OptunaSearch):
    """OptunaSearch that hands Optuna the epochs that were evaluated only.

    With ``eval.every_epochs`` above 1 the epochs between evaluations report no
    metric; Ray's OptunaSearch would fail on them (a KeyError in the driver),
    where they simply have nothing to tell the sampler.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


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


def make_scheduler(space: SearchSpace, epochs: int, search_dir: str | Path | Location | SearchDir) -> Any:
    if space.scheduler.type == "none":
        return None
    s = space.scheduler
    return PersistentASHA(  # metric/mode come from TuneConfig
        SearchDir.at(search_dir).asha_file,
        max_t=s.max_epochs or epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )
