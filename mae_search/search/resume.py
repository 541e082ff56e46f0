"""What a search directory decides before Ray starts: a new search must not overwrite a recorded one,
and ``--resume`` continues exactly the recorded search, on a cluster that can hold it."""

from __future__ import annotations

import json
from typing import Any

from ray import tune

from mae_search.config import ConfigError
from mae_search.search.cluster import ClusterPlan
from mae_search.search.search_dir import SearchDir
from mae_search.search.space import SearchSpace


def first_difference(recorded: Any, given: Any, prefix: str = "") -> str | None:
    """The first dotted key where two JSON-like values differ, shown with both values; None if equal."""
    if isinstance(recorded, dict) and isinstance(given, dict):
        for key in sorted(set(recorded) | set(given)):
            found = first_difference(recorded.get(key), given.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if recorded == given else f"{prefix[:-1]} (recorded {recorded!r}, now {given!r})"


def check_tune_state(space: SearchSpace, search_dir: SearchDir) -> None:
    """Refuse to resume from a damaged Tune experiment state: Tune would start a new, empty experiment
    (trials without their config) and report success. The results table is untouched either way."""
    states = sorted(search_dir.root.glob("experiment_state-*.json"))
    if not states:
        raise ConfigError(f"search '{space.name}': no Tune experiment state under {search_dir}, nothing to resume")
    for state in states:
        try:
            trials = json.loads(state.read_text()).get("trial_data")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            trials, reason = None, f"{type(exc).__name__}: {str(exc)[:120]}"
        else:
            reason = "no trial data"
        if not isinstance(trials, list):
            raise ConfigError(f"search '{space.name}': Tune's experiment state {state} is damaged ({reason}); the "
                              f"finished trials are kept in {search_dir.results}; start a new search (another "
                              f"name or --storage) to run the rest")


def check_search_dir(space: SearchSpace, search_dir: SearchDir, resume: bool) -> None:
    """What the search directory alone decides, checked before Ray starts: a new search must not
    overwrite a recorded one; a resumed one must have an intact record matching this configuration."""
    exp_dir = search_dir.root
    if not resume:
        if exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(
                f"search '{space.name}' already exists under {exp_dir}: use --resume, or another --storage"
            )
        return
    if search_dir.tune_started:
        check_tune_state(space, search_dir)
    elif not (search_dir.space_file.is_file() and tune.Tuner.can_restore(str(exp_dir))):
        raise ConfigError(f"search '{space.name}': nothing to resume under {exp_dir}")
    check_resumable(space, search_dir)


def check_resumable(space: SearchSpace, search_dir: Any, plan: ClusterPlan | None = None) -> str | None:
    """--resume continues exactly the recorded search: refuse, in one line, anything that would mix
    configurations (a changed file or --set) or, given the cluster's plan, hang it (a cluster too
    small for its concurrent trials). Returns a line for the user when the cluster could hold more
    concurrent trials than recorded. ``search_dir``: a SearchDir or its path."""
    search_dir = SearchDir.at(search_dir)
    record = search_dir.space_file
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
    plan_file = search_dir.plan_file
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
