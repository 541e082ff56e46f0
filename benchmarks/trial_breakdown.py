"""Where a trial's time goes: start-up, pre-training, each part of the evaluation, checkpoints (issue 29).

One seed of a trial is run in this process as a search's seed task runs it
(``Trainer.fit`` with a checkpoint after every epoch, torch on one thread as a
1-CPU trial), with each phase timed exclusively (a phase's time excludes the
phases it calls): start-up (data and model), pre-training epochs, feature
extraction, linear probe, k-NN, reconstruction metrics and grid, fine-tuning,
checkpoints, and the rest. Ray's own per-trial cost is measured by
``benchmarks.trial_overhead``.

Configurations: the embedded quickstart, the tiny mask-ratio ablation
(``search_spaces/mask_ratio_tiny.yaml``, as its trials run) and the STL-10 ViT
geometry at 224 px (``stl10-vit-tiny``) for a few steps on generated images of
that size (STL-10 itself cannot be downloaded here).

    python -m benchmarks.trial_breakdown [--only quickstart,tiny,stl10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, write_section

PHASES = ("start-up", "pre-training", "features", "probe", "k-NN", "reconstruction", "fine-tuning", "checkpoint",
          "other")
EVALUATION = ("features", "probe", "k-NN", "reconstruction", "fine-tuning")


class PhaseClock:
    """Exclusive wall time per phase: a phase running inside another is taken out of the outer one."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [phase, start, time of the phases inside]

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([phase, self.now(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, inner = self._stack.pop()
                took = self.now() - start
                self.seconds[name] += took - inner
                if self._stack:
                    self._stack[-1][2] += took
        return timed


def instrument(clock: PhaseClock) -> Callable[[], None]:
    """Wrap the functions a trial's epoch calls; returns the function that puts them back."""
    import mae_search.training.evaluate as ev
    import mae_search.training.train as tr

    patches = [(ev, "extract_features", "features"), (ev, "pixel_features", "features"),
               (ev, "fit_linear_probe", "probe"), (ev, "probe_accuracy", "probe"), (ev, "knn_accuracy", "k-NN"),
               (ev, "reconstruct", "reconstruction"), (ev, "reconstruction_metrics", "reconstruction"),
               (ev, "finetune", "fine-tuning"), (tr.Trainer, "train_one_epoch", "pre-training"),
               (tr.Trainer, "save_reconstruction", "reconstruction"), (tr.Trainer, "save", "checkpoint"),
               (tr.Trainer, "evaluate", "other")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, phase in patches:
        setattr(owner, name, clock.wrap(phase, getattr(owner, name)))

    def restore() -> None:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    return restore


def configurations() -> dict[str, tuple[str, Any]]:
    from mae_search.search.space import load_search_space

    quick = load_search_space(Path("mae_search/default_search.yaml"))
    tiny = load_search_space(Path("search_spaces/mask_ratio_tiny.yaml"))
    stl = tiny.base.with_overrides({
        "model.preset": "stl10-vit-tiny", "data.num_train": 256, "data.num_labelled": 128,
        "data.num_test": 128, "batch_size": 32, "epochs": 1, "eval.finetune.epochs": 1,
        "eval.finetune.batch_size": 32, "eval.probe.epochs": 20})
    return {
        "quickstart": ("the embedded quickstart's base trial (`mae-search search` with no file)", quick.base),
        "tiny": ("`mask_ratio_tiny.yaml` at 0.75, seed 0, as its trials run",
                 tiny.trial_config({"masking.mask_ratio": 0.75}, seed=0)),
        "stl10": ("`stl10-vit-tiny` at 224 px: 1 epoch of 256 generated images, 1 fine-tuning epoch", stl),
    }


def breakdown(cfg: Any) -> dict[str, float]:
    from mae_search.training.train import Trainer

    clock = PhaseClock()
    restore = instrument(clock)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = clock.wrap("start-up", Trainer)(cfg)
            trainer.fit(lambda epoch, metrics, _: trainer.save(Path(tmp) / f"checkpoint_{epoch:06d}"))
            trainer.save_reconstruction(Path(tmp) / "grid.png")
    finally:
        restore()
    total = time.perf_counter() - started
    shares = dict(clock.seconds)
    shares["other"] = shares.get("other", 0.0) + total - sum(clock.seconds.values())
    return {"total": total, **shares}


def earlier_rows(rewritten: set[str]) -> list[str]:
    """The section's table rows from earlier runs (other trials or labels: before / after), less those this
    run writes again (matched by their first cell)."""
    from benchmarks.common import RESULTS

    text = RESULTS.read_text() if RESULTS.exists() else ""
    section = text.partition("<!-- trial-breakdown:begin -->")[2].partition("<!-- trial-breakdown:end -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| trial |")]
    return [row for row in rows if row.split("|")[1].strip() not in rewritten]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="quickstart,tiny,stl10")
    parser.add_argument("--label", default="", help="a name for this run's rows (e.g. before / after)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a trial with cpus_per_worker: 1 (and the machine line says so)
    chosen = args.only.split(",")
    lines = [
        "## Where a trial's time goes (issue 29)\n",
        f"Machine: {machine()}. `python -m benchmarks.trial_breakdown`: one seed of a trial run in-process as a "
        "search's seed task runs it (checkpoint after every epoch, torch on 1 thread as a 1-CPU trial), each "
        "phase timed exclusively. Evaluation = features + probe + k-NN + reconstruction + fine-tuning. Ray's "
        "per-trial cost (about 1.4 s for a Tune trial with a Ray task) is in the trial-overhead section. A row's "
        "label names the run it comes from (`--label`; `after`: the quickstart evaluated at its ASHA rungs and "
        "the end only); rows without one are the first run.\n",
        "| trial | wall (s) | " + " | ".join(PHASES) + " | evaluation |",
        "|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    label = f" {args.label}" if args.label else ""
    lines += earlier_rows({key + label for key in chosen})
    notes = []
    for key, (what, cfg) in configurations().items():
        notes.append(f"- {key}: {what}.")
        if key not in chosen:
            continue
        row = breakdown(cfg)
        total = row["total"]
        evaluation = sum(row.get(p, 0.0) for p in EVALUATION) / total
        cells = " | ".join(f"{100 * row.get(p, 0.0) / total:.0f} %" for p in PHASES)
        lines.append(f"| {key}{label} | {total:.0f} | {cells} | **{100 * evaluation:.0f} %** |")
        print(lines[-1], flush=True)
    write_section("trial-breakdown", "\n".join(lines + [""] + notes) + "\n")


if __name__ == "__main__":
    main()
