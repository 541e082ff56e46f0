"""What runs on the cluster's workers: one seed's training, and the reference rows.

A seed trains either in a Ray Train worker group (:class:`TrainSession`,
DDP over several workers) or in one Ray task (:class:`TaskSession`, no Train
controller or worker group to start). Both hand the same :func:`train_seed`
the same small interface (rank, device, latest checkpoint, report), so the
training loop and its fault handling are one piece of code; reports reach the
trial's driver (:mod:`mae_search.search.trial`) through its queue either way.

This module imports torch; the trial driver imports it only inside the
workers' processes, so a Tune trial's own process starts in a second.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.util.queue import Queue

from mae_search.config import ConfigError, TrainConfig
from mae_search.data.load import DataError, load_data
from mae_search.search.record import FATAL_KEY, GRID_FILE, NODE_KEY, REPLAY_KEY
from mae_search.storage import Location
from mae_search.training.checkpoint import CHECKPOINT_FILE, KEEP_CHECKPOINTS, CheckpointError
from mae_search.training.evaluate import evaluate_reference
from mae_search.training.train import Trainer, resolve_device


class SeedReportCallback(ray.train.UserCallback):
    """Forwards one seed's Ray Train reports (rank 0's metrics, the checkpoint path) to its trial's driver.

    Ray's ``TuneReportCallback`` does the same for a trial of one Train run; a
    seed-averaged trial runs several and must hold each epoch until every seed
    has reported it, so the reports go to a queue the trial's driver reads.
    """

    def __init__(self, queue: Queue, seed: int) -> None:
        self.queue, self.seed = queue, seed

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        path = str(Location.in_filesystem(checkpoint.filesystem, checkpoint.path)) if checkpoint else ""
        self.queue.put((self.seed, dict(metrics[0]), path))


class TrainSession:
    """A seed trained by a Ray Train worker group (DDP when it has several workers): reports and
    checkpoints go through ``ray.train``, which restarts the group from the latest checkpoint."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.wrap_model = ray.train.torch.prepare_model if self.world_size > 1 else None

    def latest_checkpoint(self) -> Location | None:
        checkpoint = ray.train.get_checkpoint()
        return Location.in_filesystem(checkpoint.filesystem, checkpoint.path) if checkpoint else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TaskSession:
    """A seed trained by one Ray task: no Train controller or worker group to start (a trial then costs
    about an empty Tune trial's start-up, 1.4 s here, against 10.6 s with one; benchmarks/RESULTS.md),
    the same checkpoint layout under the seed's run directory, and reports
    sent straight to the trial's queue. Ray retries the task when its process dies
    (``max_retries``), and the retry restores from the latest checkpoint, as Ray Train would."""

    rank, world_size, wrap_model = 0, 1, None

    def __init__(self, cfg: TrainConfig, run_dir: Location, queue: Queue, seed: int) -> None:
        self.device = resolve_device(cfg.device)  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
        self.run_dir, self.queue, self.seed = run_dir, queue, seed

    def latest_checkpoint(self) -> Location | None:
        found = self.run_dir.glob("checkpoint_*")  # sorted; a local checkpoint being written is hidden (.name)
        return found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        path = ""
        if checkpoint_dir is not None:
            final = self.run_dir / f"checkpoint_{int(metrics['epoch']):06d}"
            # Whole or not at all locally; in an object store the checkpoint file comes last, so a
            # directory without it is seen as damaged and restore_intact takes the one before.
            final.upload_dir(checkpoint_dir, last=CHECKPOINT_FILE)
            for old in self.run_dir.glob("checkpoint_*")[:-KEEP_CHECKPOINTS]:
                old.rmtree()
            path = str(final)
        self.queue.put((self.seed, dict(metrics), path))


Session = TrainSession | TaskSession


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker (``ray_train`` runner)."""
    run_guarded(loop_config, lambda cfg: TrainSession())


def run_seed_task(loop_config: dict[str, Any], run_dir: Location, queue: Queue) -> None:
    """Body of a seed's Ray task (``ray_task`` runner)."""
    run_guarded(loop_config, lambda cfg: TaskSession(cfg, run_dir, queue, cfg.seed))


def run_guarded(loop_config: dict[str, Any], make_session: Callable[[TrainConfig], Session]) -> None:
    """Train one seed; a configuration, data or checkpoint error would fail the same way on every retry,
    so instead of raising (which Ray retries up to max_failures times) it is reported as one line and
    the trial's driver fails the trial with it at once."""
    cfg = TrainConfig.model_validate(loop_config["train_config"])
    session = make_session(cfg)
    try:
        train_seed(cfg, int(loop_config.get("threads", 1)), session)
    except (ConfigError, DataError, CheckpointError) as exc:
        session.report({FATAL_KEY: f"{type(exc).__name__}: {exc}"})


def train_seed(cfg: TrainConfig, threads: int, session: Session) -> None:
    """Train one seed's configuration to its last epoch, from its latest intact checkpoint if any."""
    torch.set_num_threads(max(1, threads))
    rank = session.rank
    trainer = Trainer(cfg, rank=rank, world_size=session.world_size, device=session.device,
                      wrap_model=session.wrap_model)

    node_id = ray.get_runtime_context().get_node_id()
    restored_from = 0
    latest = session.latest_checkpoint()
    if latest is not None:
        restored_path = restore_intact(trainer, latest)
        restored_from = trainer.epoch
        # The epochs the checkpoint holds, re-sent once: any the search did not record before the fault
        # (a Ctrl-C between checkpoint and result, or a seed that ran ahead of the others) are recorded now.
        session.report({REPLAY_KEY: replayed_history(trainer.history, restored_path)})

    def on_epoch_end(epoch: int, metrics: dict[str, float], t: Trainer) -> None:
        report = {**metrics, "pretrain_time_s": sum(h["epoch_time_s"] for h in t.history),
                  "restored_from_epoch": restored_from, NODE_KEY: node_id}
        if rank != 0:
            session.report(report)
            return
        with tempfile.TemporaryDirectory() as tmp:
            t.save(Path(tmp) / CHECKPOINT_FILE)
            t.save_reconstruction(Path(tmp) / GRID_FILE)
            session.report(report, Path(tmp))

    trainer.fit(on_epoch_end)


def restore_intact(trainer: Trainer, latest: Location) -> str:
    """Resume from the latest checkpoint, or, when that one is damaged, from the newest intact one kept
    before it (``KEEP_CHECKPOINTS``); returns the path used. Failing over (rather than failing the trial
    after every retry hits the same file) loses at most the epochs since the older one."""
    try:
        trainer.resume(latest / CHECKPOINT_FILE)
        return str(latest)
    except CheckpointError as exc:
        first_error = exc
    older = sorted((p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name < latest.name),
                   reverse=True)  # Ray Train's checkpoints and the task runner's share the name pattern
    for path in older:
        try:
            trainer.resume(path / CHECKPOINT_FILE)
        except CheckpointError:
            continue
        print(f"warning: {first_error}; resumed from the older checkpoint {path} instead", flush=True)
        return str(path)
    raise CheckpointError(f"{first_error}; no older intact checkpoint beside it") from None


def replayed_history(history: list[dict[str, float]], checkpoint_path: str) -> list[dict[str, Any]]:
    """A restored trainer's per-epoch metrics as they were reported (the last epoch with its checkpoint)."""
    out, elapsed = [], 0.0
    for metrics in history:
        elapsed += metrics.get("epoch_time_s", 0.0)
        out.append({**metrics, "pretrain_time_s": elapsed, "checkpoint_path": ""})
    if out:
        out[-1]["checkpoint_path"] = checkpoint_path
    return out


def reference_task(cfg_json: dict[str, Any], kind: str, threads: float) -> dict[str, float]:
    """One reference row (random-init encoder or raw pixels) for one seed, as a Ray task.

    A plain task, not a Train run: it needs no worker group, so it costs about
    a second of Ray start-up rather than a trial's.
    """
    torch.set_num_threads(max(1, int(threads)))
    cfg = TrainConfig.model_validate(cfg_json)
    data = load_data(cfg.data, cfg.model, seed=cfg.seed)
    train, targets = data.scored(final=True)  # what a trial's last epoch is evaluated on
    return evaluate_reference(kind, cfg.model, train, targets, cfg.eval, resolve_device(cfg.device), cfg.seed)
