"""Can a tiny ablation trial fine-tune for less without changing its fine-tuning numbers? (issue 29)

Fine-tuning is 37 % of a tiny ablation trial's wall time (``benchmarks.trial_breakdown``); the issue
asks for evaluation at most 20 %, with each cheaper evaluation checked against today's on at least 5
trained encoders (fine-tuning within its seed spread). This benchmark does that check:

- pre-trains 5 encoders as ``search_spaces/mask_ratio_tiny.yaml``'s trials do (ratios 0.15 / 0.5 /
  0.75 / 0.9 at seed 0, and 0.75 at seed 1);
- fine-tunes each with today's recipe (30 epochs) and with each cheaper candidate, 3 fine-tuning
  seeds apiece, scored on the test split;
- calls a candidate faithful when the paired (by encoder) mean difference, with its 95 % t-interval,
  lies within plus or minus today's seed spread (the pooled standard deviation over fine-tuning seeds
  on one encoder), and gives the rank correlation of the encoders under both recipes;
- counts the FLOPs of a pre-training and a fine-tuning step (torch's FlopCounterMode), to say which
  share of a trial's arithmetic fine-tuning is, whatever the implementation.

Two processes of one torch thread each, as two 1-CPU trials; about 30 minutes on 2 cores.

    python -m benchmarks.finetune_fidelity
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, write_section

SPACE = "search_spaces/mask_ratio_tiny.yaml"
ENCODERS = ((0.15, 0), (0.5, 0), (0.75, 0), (0.9, 0), (0.75, 1))  # (mask ratio, pre-training seed)
TODAY = "today: 30 epochs, blr 4e-3"
CANDIDATES = {
    "15 epochs, blr 8e-3, warm-up 1": {"epochs": 15, "blr": 8e-3, "warmup_epochs": 1},
    "10 epochs, blr 1.2e-2, warm-up 1": {"epochs": 10, "blr": 1.2e-2, "warmup_epochs": 1},
}
RECIPES = {TODAY: {}, **CANDIDATES}
FT_SEEDS = (0, 1, 2)


@dataclass
class Fidelity:
    """A candidate recipe against today's on the same encoders."""

    deltas: list[float]  # per encoder: candidate mean minus today's mean (over fine-tuning seeds)
    mean: float  # mean of deltas
    half: float  # 95 % t-interval half-width of that mean
    spread: float  # today's seed spread: pooled std over fine-tuning seeds on one encoder
    spearman: float  # rank correlation of the encoders' means under the two recipes

    @property
    def faithful(self) -> bool:
        return abs(self.mean) + self.half <= self.spread


def seed_spread(runs: list[list[float]]) -> float:
    """Pooled standard deviation over fine-tuning seeds, each encoder's runs about its own mean."""
    return math.sqrt(statistics.mean(statistics.variance(a) for a in runs))


def compare(today: list[list[float]], candidate: list[list[float]]) -> Fidelity:
    """``today[i]`` and ``candidate[i]``: accuracies of encoder i over fine-tuning seeds."""
    from scipy import stats

    means_today = [statistics.mean(a) for a in today]
    means_cand = [statistics.mean(a) for a in candidate]
    deltas = [c - t for c, t in zip(means_cand, means_today, strict=True)]
    n = len(deltas)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(deltas) / math.sqrt(n)
    rho = stats.spearmanr(means_today, means_cand).statistic
    return Fidelity(deltas, statistics.mean(deltas), float(half), seed_spread(today), float(rho))


def trial_config(ratio: float, seed: int) -> Any:
    from mae_search.search.space import load_search_space

    space = load_search_space(Path(SPACE))
    return space.trial_config({"masking.mask_ratio": ratio}, seed=seed).with_overrides({"eval.finetune.at": "never"})


def pretrain(job: tuple[tuple[float, int], Path]) -> None:
    from mae_search.mae.model import encoder_state_dict
    from mae_search.training.train import Trainer

    torch.set_num_threads(1)
    (ratio, seed), folder = job
    trainer = Trainer(trial_config(ratio, seed))
    trainer.fit()
    torch.save(encoder_state_dict(trainer.model), folder / f"encoder_{ratio}_{seed}.pt")


def finetune_once(job: tuple[tuple[float, int], str, int, Path]) -> tuple[float, float]:
    """Test accuracy and wall time of one fine-tuning run."""
    from mae_search.data.load import load_data
    from mae_search.training.finetune import finetune

    torch.set_num_threads(1)
    (ratio, seed), recipe, ft_seed, folder = job
    cfg = trial_config(ratio, seed)
    data = load_data(cfg.data, cfg.model, seed=cfg.seed)  # the splits a trial of this seed scores on
    encoder = torch.load(folder / f"encoder_{ratio}_{seed}.pt")
    ft = cfg.eval.finetune.model_copy(update=RECIPES[recipe])
    result = finetune(encoder, cfg.model, data.train, data.test, ft, device=torch.device("cpu"), seed=ft_seed)
    return result.accuracy, result.time_s


def flops_per_image() -> tuple[float, float, Any]:
    """Training FLOPs per image of one pre-training and one fine-tuning step, and the trial config."""
    from torch.utils.flop_counter import FlopCounterMode

    from mae_search.mae.model import MaskedAutoencoderViT, encoder_state_dict
    from mae_search.training.finetune import build_classifier

    cfg = trial_config(0.75, 0)
    images = torch.randn(8, 3, cfg.model.img_size, cfg.model.img_size)
    mae = MaskedAutoencoderViT(cfg.model)
    classifier = build_classifier(encoder_state_dict(mae), cfg.model, 10, cfg.eval.finetune)
    counted = []
    for run in (lambda: mae(images, cfg.masking.mask_ratio).pred.square().mean(),
                lambda: classifier(images).logsumexp(1).mean()):
        with FlopCounterMode(display=False) as counter:
            run().backward()
        counted.append(counter.get_total_flops() / len(images))
    return counted[0], counted[1], cfg


def flop_lines() -> list[str]:
    from mae_search.data.load import load_data

    pre, fine, cfg = flops_per_image()
    batch = cfg.eval.finetune.batch_size
    labelled = len(load_data(cfg.data, cfg.model, seed=cfg.seed).train)
    train_images = labelled // batch * batch  # what an epoch of fine-tuning steps through
    pre_total = pre * cfg.epochs * cfg.data.num_train
    per_epoch = fine * train_images
    fine_total = per_epoch * cfg.eval.finetune.epochs
    share = fine_total / (pre_total + fine_total)
    most = 0.25 * pre_total / per_epoch  # evaluation <= 20 % of the total: at most a quarter of pre-training
    return [f"FLOPs (fwd + bwd, per image): pre-training {pre / 1e6:.0f} M at mask ratio "
            f"{cfg.masking.mask_ratio}, fine-tuning {fine / 1e6:.0f} M. A 0.75 trial: {cfg.epochs} epochs x "
            f"{cfg.data.num_train:,} images of pre-training, {cfg.eval.finetune.epochs} x {train_images:,} of "
            f"fine-tuning, so **fine-tuning is {100 * share:.0f} % of the trial's arithmetic**; at the same "
            f"speed per FLOP, evaluation at 20 % of the wall time leaves fine-tuning at most {most:.1f} epochs."]


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, get_context("spawn").Pool(2) as pool:
        folder = Path(tmp)
        pool.map(pretrain, [(enc, folder) for enc in ENCODERS], chunksize=1)
        jobs = [(enc, recipe, s, folder) for recipe in RECIPES for s in FT_SEEDS for enc in ENCODERS]
        results = dict(zip(jobs, pool.map(finetune_once, jobs, chunksize=1), strict=True))
    acc = {r: [[100 * results[(e, r, s, folder)][0] for s in FT_SEEDS] for e in ENCODERS] for r in RECIPES}
    secs = {r: statistics.mean(results[j][1] for j in jobs if j[1] == r) for r in RECIPES}
    write_section("finetune-fidelity", render(acc, secs, time.perf_counter() - started))


def render(acc: dict[str, list[list[float]]], secs: dict[str, float], wall: float) -> str:
    names = [f"{r} s{s}" for r, s in ENCODERS]
    lines = [
        "## Cheaper fine-tuning against today's on the same encoders (issue 29)\n",
        f"Machine: {machine()}. `python -m benchmarks.finetune_fidelity` ({wall / 60:.0f} min): "
        f"{len(ENCODERS)} encoders pre-trained as `{SPACE}`'s trials (ratio, seed), each fine-tuned "
        f"with {len(FT_SEEDS)} fine-tuning seeds per recipe; test top-1 (%), mean ± std over those "
        "seeds. Faithful: the paired mean difference and its 95 % t-interval within ± today's seed "
        "spread (pooled std over fine-tuning seeds). Time: mean wall time of one fine-tuning run, "
        "two at a time on one thread each.\n",
        "| recipe | " + " | ".join(names) + " | Δ vs today (95 % CI) | Spearman | time (s) | faithful |",
        "|---|" + "---|" * (len(names) + 4),
    ]
    for recipe, rows in acc.items():
        cells = " | ".join(f"{statistics.mean(a):.1f} ± {statistics.stdev(a):.1f}" for a in rows)
        if recipe == TODAY:
            lines.append(f"| {recipe} | {cells} | seed spread {seed_spread(rows):.1f} | - | {secs[recipe]:.0f} | - |")
            continue
        fid = compare(acc[TODAY], rows)
        verdict = "yes" if fid.faithful else "**no**"
        lines.append(f"| {recipe} | {cells} | {fid.mean:+.1f} ± {fid.half:.1f} | {fid.spearman:+.2f} | "
                     f"{secs[recipe]:.0f} ({secs[recipe] / secs[TODAY]:.2f}x) | {verdict} |")
    return "\n".join(lines + [""] + flop_lines()) + "\n"


if __name__ == "__main__":
    main()
