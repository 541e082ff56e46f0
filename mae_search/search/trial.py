"""A Tune trial's driver: it trains its configuration once per seed and reports the mean to Tune.

Each seed runs as a Ray task (one process; the default for one worker) or as a
Ray Train run (a worker group, DDP). The seeds' reports arrive on a queue;
:class:`SeedAverager` reports an epoch to Tune once every seed has it, so
Optuna and ASHA see the mean over seeds.

This module does not import torch: it is what every Tune trial's own process
imports, and torch with the project's model code costs seconds per trial.
The training code (:mod:`mae_search.search.seed_run`) is imported in the processes
that train.
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

import ray
from ray import tune
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mae_search.config import TrainConfig
from mae_search.metrics import BY_NAME
from mae_search.search.record import (
    FATAL_KEY,
    PER_SEED_KEY,
    REPLAY_KEY,
    REPLAYED_KEY,
    numbers,
    seed_trial_id,
    split_config,
)
from mae_search.search.search_dir import SearchDir
from mae_search.search.space import SearchSpace
from mae_search.storage import Location


def seed_task(loop_config: dict[str, Any], run_dir: Location, queue: Queue) -> None:
    """A seed's Ray task (``ray_task`` runner): the training code is imported in the task's process."""
    from mae_search.search.seed_run import run_seed_task

    run_seed_task(loop_config, run_dir, queue)


class TrialError(RuntimeError):
    """A trial that cannot succeed (its configuration, data or checkpoint is unusable); not retried."""


class SeedAverager:
    """Turns the seeds' per-epoch reports into the trial's results: one per epoch, once every seed has it.

    The result carries the mean over seeds under each metric's own name (what
    Optuna optimises and ASHA compares at its rungs), ``<metric>_std`` for the
    registry's metrics, and each seed's own values under ``per_seed``, which
    the results table and MLflow record. Epochs replayed by a restored seed
    complete the epochs the others still need; an epoch is reported once per
    trial run.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = list(seeds)
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}  # epoch -> seed -> its report
        self.reported: set[int] = set()

    def add(self, seed: int, metrics: dict[str, Any], checkpoint: str) -> list[dict[str, Any]]:
        """One report of one seed; returns the trial results it completes, in epoch order."""
        if FATAL_KEY in metrics:
            raise TrialError(f"seed {seed}: {metrics[FATAL_KEY]}")
        if REPLAY_KEY in metrics:
            return [out for entry in metrics[REPLAY_KEY]
                    for out in self._add(seed, {**entry, REPLAYED_KEY: True}, entry.get("checkpoint_path", ""))]
        return self._add(seed, metrics, checkpoint)

    def _add(self, seed: int, metrics: dict[str, Any], checkpoint: str) -> list[dict[str, Any]]:
        epoch = int(metrics["epoch"])
        if epoch in self.reported:
            return []
        self.pending.setdefault(epoch, {})[seed] = {**metrics, "checkpoint_path": checkpoint}
        ready = []
        for e in sorted(self.pending):
            if len(self.pending[e]) < len(self.seeds):
                break
            ready.append(self.result(e, self.pending.pop(e)))
            self.reported.add(e)
        return ready

    def result(self, epoch: int, entries: dict[int, dict[str, Any]]) -> dict[str, Any]:
        values = [numbers(entry) for entry in entries.values()]
        keys = sorted(set.intersection(*(set(v) for v in values)) - {"epoch"})
        out: dict[str, Any] = {k: statistics.fmean(v[k] for v in values) for k in keys}
        if len(entries) > 1:
            out |= {f"{k}_std": statistics.stdev(v[k] for v in values) for k in keys if k in BY_NAME}
        else:
            out["checkpoint_path"] = next(iter(entries.values()))["checkpoint_path"]
        out |= {"epoch": epoch, "seeds": len(entries), PER_SEED_KEY: {str(s): e for s, e in sorted(entries.items())}}
        return out


def seed_trainer(space: SearchSpace, search_dir: SearchDir, trial_id: str, cfg: TrainConfig, queue: Queue) -> Any:
    """The Ray Train run of one seed of a trial. Its name is fixed by (trial, seed), so a restarted
    trial's run restores from its own checkpoints."""
    import ray.train.torch  # torch: imported by the trials that train with Ray Train only

    from mae_search.search.ddp import LoopbackTorchConfig
    from mae_search.search.seed_run import SeedReportCallback, train_loop_per_worker
    from mae_search.training.checkpoint import KEEP_CHECKPOINTS

    res = space.resources
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(space, cfg),
        torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=seed_trial_id(trial_id, cfg.seed, space.seed_averaged),
            storage_path=str(search_dir.train_runs),
            failure_config=ray.train.FailureConfig(max_failures=space.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[SeedReportCallback(queue, cfg.seed)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def run_trial(config: dict[str, Any], space: SearchSpace, search_dir: SearchDir, parallel_seeds: int = 1) -> None:
    """Tune trainable: one trial = one configuration, trained as one run per seed (a Ray task, or a
    Ray Train worker group for DDP); ``parallel_seeds`` of them run at once (what the cluster holds,
    see plan_concurrency)."""
    trial_id = tune.get_context().get_trial_id()
    params, _ = split_config(config)
    seeds = space.seeds_of_trial(config)
    queue = Queue(actor_options=driver_side())
    slots = threading.Semaphore(parallel_seeds)
    errors: list[BaseException] = []

    def fit(seed: int) -> None:
        with slots:
            try:
                train_one_seed(space, search_dir, trial_id, space.trial_config(params, seed), queue)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the trial's thread below
                errors.append(exc)

    threads = [threading.Thread(target=fit, args=(seed,), daemon=True) for seed in seeds]
    for thread in threads:
        thread.start()
    averager = SeedAverager(seeds)
    while True:
        item = next_report(queue)
        if item is not None:
            for result in averager.add(*item):
                tune.report(result)
        elif errors:  # a seed's run failed for good (past its max_failures): the trial fails with its error
            raise errors[0]
        elif not any(t.is_alive() for t in threads) and queue.empty():
            return


def train_one_seed(space: SearchSpace, search_dir: SearchDir, trial_id: str, cfg: TrainConfig, queue: Queue) -> None:
    """Train one seed of a trial to the end, its reports going to ``queue``; blocks until it is done.

    The seed's run directory is named by (trial, seed), so a restarted trial's run restores from its
    own checkpoints, whichever runner trains it.
    """
    if space.resources.uses_ray_train:
        seed_trainer(space, search_dir, trial_id, cfg, queue).fit()
        return
    res = space.resources
    run_dir = search_dir.train_runs / seed_trial_id(trial_id, cfg.seed, space.seed_averaged)
    run_dir.mkdir()
    task = ray.remote(seed_task).options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
        max_retries=space.max_failures, retry_exceptions=False,  # a lost process is retried, an error is not
    )
    ray.get(task.remote(loop_config(space, cfg), run_dir, queue))


def loop_config(space: SearchSpace, cfg: TrainConfig) -> dict[str, Any]:
    """What a seed's training process gets: its resolved configuration and its thread count."""
    return {"train_config": cfg.model_dump(mode="json"), "threads": space.resources.cpus_per_worker}


def driver_side() -> dict[str, Any]:
    """Actor options that keep an actor beside the trial's driver (its placement group's first bundle, on
    the head node), not on a worker node whose loss would take it down with the seed training there."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return {"num_cpus": 0}
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    return {"num_cpus": 0, "scheduling_strategy": strategy}


def next_report(queue: Queue, timeout_s: float = 0.5) -> tuple[int, dict[str, Any], str] | None:
    try:
        return queue.get(timeout=timeout_s)
    except Empty:
        return None
