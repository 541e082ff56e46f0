"""Search efficiency: the same small Optuna search with ASHA and without, and Ray's per-trial overhead.

Both searches run in one local Ray instance, one after the other, with the same
TPE seed and the same two known configurations first. Reported: wall time and
CPU-seconds (trial time x CPUs per trial) as ratios, the best metric each found,
and the per-trial overhead: a trial's time as Tune measures it minus a bare
in-process run of the same configuration (Trainer.fit, no Ray).

    python -m benchmarks.search_efficiency
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from benchmarks.common import machine, write_section
from mae_search.config import TrainConfig
from mae_search.search.cluster import loopback_node
from mae_search.search.results import final_rows, read_results
from mae_search.search.results_callback import ResultsTableCallback
from mae_search.search.run import tune_search
from mae_search.search.space import parse_search_space
from mae_search.training.train import Trainer

SPACE = {
    "base": {"epochs": 4, "batch_size": 128, "optim": {"warmup_epochs": 1},
             "data": {"num_train": 1024, "num_test": 256},
             "eval": {"probe": {"epochs": 10}, "finetune": {"at": "never"}}},
    "dimensions": {"optim.blr": {"loguniform": [1.0e-5, 2.0e-2]}, "masking.mask_ratio": {"uniform": [0.5, 0.9]}},
    "initial_points": [{"optim.blr": 5.0e-3, "masking.mask_ratio": 0.75},
                       {"optim.blr": 2.0e-5, "masking.mask_ratio": 0.75}],
    "metric": "loss", "mode": "min", "sampler": "tpe", "max_concurrent_trials": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def search(name: str, scheduler: dict, trials: int, storage: Path) -> tuple[float, object]:
    space = parse_search_space({**SPACE, "name": name, "num_samples": trials, "scheduler": scheduler}, name)
    callback = ResultsTableCallback(storage / name, space.base.epochs, space)
    start = time.perf_counter()
    tune_search(space, Path(storage) / space.name, callbacks=[callback])
    return time.perf_counter() - start, final_rows(read_results(storage / name))


def bare_run(config_json: str) -> float:
    cfg = TrainConfig.model_validate_json(config_json)
    torch.set_num_threads(1)  # the same one CPU a trial's worker has
    start = time.perf_counter()
    Trainer(cfg).fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    with loopback_node():  # as a search's own local instance
        ray.init(num_cpus=2, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        asha_wall, asha = search("eff-asha", {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                                 args.trials, storage)
        full_wall, full = search("eff-full", {"type": "none"}, args.trials, storage)
    ray.shutdown()
    cpu_s = {k: float(df["trial_time_s"].sum()) for k, df in (("asha", asha), ("full", full))}
    done = full[full["status"] == "completed"].sort_values("trial_id").head(3)
    overheads = []
    for _, row in done.iterrows():
        bare = bare_run(row["config_json"])
        overheads.append((row["trial_time_s"], bare))
    stopped = int((asha["status"] == "stopped_early").sum())
    lines = [
        "## Search efficiency (ASHA vs none) and per-trial Ray overhead",
        "",
        f"Machine: {machine()}. Local Ray with 2 CPUs, {args.trials} Optuna (TPE) trials of the tiny model "
        "(4 epochs, 1024 images, 1 CPU per trial, 2 at a time), objective min loss; one run of "
        "`python -m benchmarks.search_efficiency`.",
        "",
        "| search | wall time ratio | CPU-seconds ratio | trials stopped early | best loss |",
        "|---|---|---|---|---|",
        f"| no scheduler (every trial to the end) | 1.00 | 1.00 | 0 | {full['loss'].min():.4f} |",
        f"| ASHA (grace 1, reduction 2) | {asha_wall / full_wall:.2f} | {cpu_s['asha'] / cpu_s['full']:.2f} | "
        f"{stopped} | {asha.loc[asha['status'] == 'completed', 'loss'].min():.4f} |",
        "",
        "Per-trial Ray overhead (trial time in Tune minus a bare `Trainer.fit` of the same config on 1 thread):",
        "",
        "| trial time (s) | bare run (s) | overhead (s) | overhead share |",
        "|---|---|---|---|",
        *[f"| {t:.1f} | {b:.1f} | {t - b:.1f} | {(t - b) / t:.0%} |" for t, b in overheads],
    ]
    write_section("search-efficiency", "\n".join(lines))


if __name__ == "__main__":
    main()
