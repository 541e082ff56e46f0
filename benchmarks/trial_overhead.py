"""Where a trial's start-up time goes, and what the ``ray_task`` runner saves against ``ray_train``.

Everything runs in one local Ray instance (2 CPUs), one trial at a time. A
trial's cost is the interval between consecutive trial completions in a
sequential search (its actor's start, imports, workers, work and teardown),
the median over the search's trials. Measured side by side, in rounds that
alternate the variants:

- an empty Tune function trial (Tune's own cost per trial);
- a Tune trial that runs an empty Ray task, and one that runs an empty
  one-worker ``TorchTrainer`` (the two ways a seed can train);
- the tiny mae-search trial (1 epoch of 256 images plus its evaluation) with
  ``resources.runner: ray_train`` (how every trial ran before) and ``ray_task``
  (the default for one worker now).

Then, in-process: the imports a fresh process pays (the trial driver's module,
the training code), data generation, model construction, the epoch and the
evaluation.

    python -m benchmarks.trial_overhead [--trials 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from benchmarks.common import machine, write_section
from mae_search.search.cluster import loopback_node
from mae_search.search.run import tune_search
from mae_search.search.space import parse_search_space

TINY = {
    "base": {"epochs": 1, "batch_size": 32,
             "model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                       "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
             "data": {"num_train": 256, "num_test": 64},
             "eval": {"probe": {"epochs": 2}, "grid_images": 4, "finetune": {"at": "never"}}},
    "metric": "loss", "mode": "min", "scheduler": {"type": "none"}, "max_concurrent_trials": 1,
}


class CompletionTimes(tune.Callback):
    """Wall-clock time of every trial's completion, in order."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.times.append(time.perf_counter())


def per_trial(times: list[float]) -> float:
    """Median interval between consecutive completions: one trial's whole cost, fixed costs excluded."""
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def empty_function(config: dict) -> None:
    tune.report({"done": 1})


def empty_task_trial(config: dict) -> None:
    ray.get(ray.remote(lambda: None).options(num_cpus=1).remote())
    tune.report({"done": 1})


def empty_train_trial(config: dict) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path=config["storage"],
                                                name=f"empty-{config['i']}-{time.time_ns()}")).fit()
    tune.report({"done": 1})


def bare_search(name: str, fn: Any, resources: Any, trials: int, storage: Path) -> float:
    times = CompletionTimes()
    tune.Tuner(tune.with_resources(fn, resources),
               param_space={"i": tune.grid_search(list(range(trials))), "storage": str(storage)},
               tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),
               run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[times],
                                         verbose=0)).fit()
    return per_trial(times.times)


def tiny_search(name: str, runner: str, trials: int, storage: Path) -> float:
    values = [0.5 + 0.4 * i / max(1, trials - 1) for i in range(trials)]
    raw = {**TINY, "name": name, "resources": {"runner": runner},
           "dimensions": {"masking.mask_ratio": {"grid": values}}}
    times = CompletionTimes()
    tune_search(parse_search_space(raw, name), Path(storage) / name, callbacks=[times], notify=lambda _: None)
    return per_trial(times.times)


def import_time(module: str) -> float:
    """Seconds a fresh interpreter with Ray already imported (as a Ray worker is) takes to import ``module``."""
    code = f"import ray, ray.tune, time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def in_process_steps() -> dict[str, float]:
    """The trial's own work, timed in this process (after its imports)."""
    import torch

    from mae_search.config import TrainConfig
    from mae_search.data.load import load_data
    from mae_search.training.train import Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate(TINY["base"])
    out = {}
    start = time.perf_counter()
    data = load_data(cfg.data, cfg.model, seed=0)
    out["data generation (256 + 64 images)"] = time.perf_counter() - start
    start = time.perf_counter()
    Trainer(cfg, data=data)
    out["model and optimiser, first in a process (with torch's one-time set-up)"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer = Trainer(cfg, data=data)
    out["model and optimiser, again in the same process (a reused task process)"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer.train_one_epoch()
    out["one epoch (8 steps)"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer.evaluate(final=True)
    out["evaluation (probe, k-NN, reconstruction)"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = {
        "empty Tune function trial": lambda n, s: bare_search(n, empty_function, {"cpu": 1}, args.trials, s),
        "Tune trial + empty Ray task": lambda n, s: bare_search(
            n, empty_task_trial, tune.PlacementGroupFactory([{"memory": 1 << 20}, {"CPU": 1}]), args.trials, s),
        "Tune trial + empty 1-worker TorchTrainer": lambda n, s: bare_search(
            n, empty_train_trial, {"cpu": 0, "memory": 1 << 20}, args.trials, s),
        "tiny mae-search trial, runner ray_train (before)": lambda n, s: tiny_search(n, "ray_train", args.trials, s),
        "tiny mae-search trial, runner ray_task (now)": lambda n, s: tiny_search(n, "ray_task", args.trials, s),
    }
    with loopback_node():  # as a search's own local instance
        ray.init(address="local", num_cpus=2, configure_logging=False, log_to_driver=False)
    results: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for i, name in enumerate(order):
                results[name].append(variants[name](f"r{r}-v{i}", Path(tmp)))
    ray.shutdown()
    cost = {name: statistics.median(v) for name, v in results.items()}
    imports = {"trial driver (`mae_search.search.trial`)": import_time("mae_search.search.trial"),
               "training code (`mae_search.search.seed_run`: torch, model, data)":
                   import_time("mae_search.search.seed_run")}
    steps = in_process_steps()
    before = cost["tiny mae-search trial, runner ray_train (before)"]
    after = cost["tiny mae-search trial, runner ray_task (now)"]
    lines = [
        "## Per-trial overhead: where a trial's start-up goes (issue 15)",
        "",
        f"Machine: {machine()}. One local Ray instance (2 CPUs), trials one at a time; a trial's cost is the "
        f"median interval between consecutive trial completions ({args.trials} trials per search, "
        f"{args.rounds} rounds alternating the variants; one run of `python -m benchmarks.trial_overhead`).",
        "",
        "| trial | s per trial | vs runner ray_train |",
        "|---|---|---|",
        *[f"| {name} | {c:.1f} | {c / before:.2f} |" for name, c in cost.items()],
        "",
        f"**The tiny trial costs {after / before:.2f}x what it did with a Ray Train run per seed** "
        f"({before:.1f} s -> {after:.1f} s per trial).",
        "",
        "What a trial's processes do before and while training (fresh interpreter with Ray imported; in-process "
        "steps on 1 thread):",
        "",
        "| step | s |",
        "|---|---|",
        *[f"| import of the {name} | {t:.2f} |" for name, t in imports.items()],
        *[f"| {name} | {t:.2f} |" for name, t in steps.items()],
    ]
    write_section("trial-overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
