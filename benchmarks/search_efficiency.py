"""Search efficiency: random search, TPE and TPE + ASHA at the same trial budget, repeated; and Ray's
per-trial overhead.

Each search runs the same small space (mask ratio and learning rate of the tiny model) for the same
number of trials, selecting on the validation linear probe; a repeat is a whole search under another
seed (the sampler's and the trials'). All searches share one local Ray instance, one after another.
Reported per variant, over the repeats: the best validation objective reached (mean ± std), the test
probe of the trial it selected, and the compute spent (CPU-seconds: trial time x CPUs per trial; wall
time) as ratios to random search. Then the per-trial overhead: a trial's time as Tune measures it minus a
bare in-process run of the same configuration (Trainer.fit, no Ray).

    python -m benchmarks.search_efficiency [--trials 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
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
    "metric": "val_linear_probe_acc", "mode": "max", "max_concurrent_trials": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}
STARTUP = 4  # TPE's random first trials; Optuna's default (10) would make an 8-trial TPE search a random one
ASHA = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
VARIANTS = {"random search": ("random", {"type": "none"}), "TPE": ("tpe", {"type": "none"}),
            "TPE + ASHA (grace 1, reduction 2)": ("tpe", ASHA)}


def search(name: str, sampler: str, scheduler: dict, trials: int, seed: int, storage: Path
           ) -> tuple[float, pd.DataFrame]:
    startup = {"startup_trials": STARTUP} if sampler == "tpe" else {}
    space = parse_search_space({**SPACE, "name": name, "sampler": sampler, "num_samples": trials,
                                "scheduler": scheduler, "seeds": [seed], **startup}, name)
    callback = ResultsTableCallback(storage / name, space.base.epochs, space)
    start = time.perf_counter()
    tune_search(space, Path(storage) / space.name, callbacks=[callback], notify=lambda _: None)
    return time.perf_counter() - start, final_rows(read_results(storage / name))


def outcome(wall: float, final: pd.DataFrame) -> dict[str, float]:
    """What one search reached and spent: its best validation probe, the test probe of that trial."""
    best = final.loc[final["val_linear_probe_acc"].idxmax()]
    return {"best_val": 100 * best["val_linear_probe_acc"], "test_of_best": 100 * best["linear_probe_acc"],
            "cpu_s": float(final["trial_time_s"].sum()), "wall_s": wall,
            "stopped": int((final["status"] == "stopped_early").sum())}


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def efficiency_table(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    base_cpu, base_wall = (np.mean([r[k] for r in runs["random search"]]) for k in ("cpu_s", "wall_s"))
    lines = ["| search | best val LP (%) | its test LP (%) | CPU-seconds ratio | wall time ratio | stopped early |",
             "|---|---|---|---|---|---|"]
    for variant, results in runs.items():
        lines.append(f"| {variant} | {mean_std([r['best_val'] for r in results])} | "
                     f"{mean_std([r['test_of_best'] for r in results])} | "
                     f"{np.mean([r['cpu_s'] for r in results]) / base_cpu:.2f} | "
                     f"{np.mean([r['wall_s'] for r in results]) / base_wall:.2f} | "
                     f"{sum(r['stopped'] for r in results)} |")
    return lines


def bare_run(config_json: str) -> float:
    cfg = TrainConfig.model_validate_json(config_json)
    torch.set_num_threads(1)  # the same one CPU a trial's worker has
    start = time.perf_counter()
    Trainer(cfg).fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with loopback_node():  # as a search's own local instance
        ray.init(address="local", num_cpus=2, configure_logging=False)  # its own, even beside `ray start`
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.repeats):
            for i, (variant, (sampler, scheduler)) in enumerate(VARIANTS.items()):
                wall, final = search(f"eff-{i}-seed{seed}", sampler, scheduler, args.trials, seed, Path(tmp))
                runs[variant].append(outcome(wall, final))
                if seed == 0 and variant == "TPE":
                    done = final[final["status"] == "completed"].sort_values("trial_id").head(3)
                print(variant, seed, runs[variant][-1], flush=True)
    ray.shutdown()
    overheads = [(row["trial_time_s"], bare_run(row["config_json"])) for _, row in done.iterrows()]
    lines = [
        "## Search efficiency: random search, TPE, TPE + ASHA; per-trial Ray overhead",
        "",
        f"Machine: {machine()}. Local Ray with 2 CPUs; each search {args.trials} trials of the tiny model over "
        "mask ratio and learning rate (4 epochs, 1,024 images, 1 CPU per trial, 2 at a time), selecting on "
        f"the validation probe; {args.repeats} repeats, each a whole search under another seed (sampler and "
        f"trials); TPE starts from {STARTUP} random trials (`startup_trials: {STARTUP}`; the same ones random "
        "search draws first, as both samplers share the seed); one run of `python -m benchmarks.search_efficiency`. "
        "Ratios are to random search's mean.",
        "",
        *efficiency_table(runs),
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
