"""Prepared, streamed data against decoding an ImageFolder into memory, on generated JPEG folders.

Measured in one run on this machine, the two input paths side by side:

- peak resident memory of one whole trial (load, one epoch of the tiny model,
  the last epoch's probe and k-NN: streamed, that reads every labelled image)
  at 1x, 4x, 16x and 64x images, a fresh process per point: its peak RSS, the peak
  PSS summed over it and its decode workers (forked, they share pages with it,
  which RSS counts in each), and the largest worker's unique memory;
- decode + augment images/s on one core, and time to the first batch;
- whether the tiny model's training step is input-bound with streaming (an
  epoch streamed through one decode worker against the same epoch in memory);
- a 4-trial search on the same data: prepared once and streamed, against
  decoding the ImageFolder in every trial (wall time, and CPU-seconds of the
  search's process tree).

    python -m benchmarks.prepared_data [--base 1000] [--resolution 64] [--factors 1 4 16 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, write_section

TINY_MODEL = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
              "decoder_depth": 1, "decoder_num_heads": 2}


def write_folder(root: Path, images: int, seed: int = 0, val: int = 200, size: tuple[int, int] = (64, 96)) -> Path:
    """A 10-class ImageFolder of JPEGs ``size`` px high and wide (by default 64-96 px: smooth colour fields
    with noise, about 4 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", val)):
        for i in range(n):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(size[0], size[1] + 1, size=2)
            base = rng.integers(0, 256, 3)
            pixels = base + np.linspace(0, 60, w)[None, :, None] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def prepare_in_process(source: Path, out: Path, resolution: int, shard_size: int = 500) -> Path:
    """The same shards `mae-search prepare` writes, made here without Ray (the benchmark times reading)."""
    from mae_search.data.prepare import PrepareSettings, plan_shards, prepare_shard, write_manifest
    from mae_search.storage import Location

    settings = PrepareSettings("imagefolder", str(source), resolution)
    classes, plans = plan_shards(settings, shard_size)
    target = Location.of(out)
    write_manifest(settings, target, classes, plans, {p.stem: prepare_shard(settings, p, target) for p in plans})
    return out


def data_config(kind: str, path: Path, **extra) -> dict:
    """The in-memory path probes 1,000 labelled images; the streamed one 1,000 until its last epoch, then
    every labelled image, streamed (``final_eval: full``, the default)."""
    labelled = {"num_labelled": 1000} if kind != "prepared" else {}
    return {"dataset": kind, "path": str(path), "eval_images": 1000, **labelled, **extra}


# --------------------------------------------------------------------------- one point, in a fresh process


class PeakMemory:
    """Samples this process and its children (the decode workers) every 50 ms, from a thread.

    A forked worker's RSS counts every page it shares with its parent, so the
    sum of RSS over-counts; PSS splits each shared page among its sharers, and its
    sum over the processes is what the trial costs the machine. USS is a worker's
    own pages only."""

    def __init__(self) -> None:
        import psutil

        self.process, self.psutil = psutil.Process(), psutil
        self.pss = self.worker_uss = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.05):
            try:
                own = self.process.memory_full_info().pss
                workers = [c.memory_full_info() for c in self.process.children(recursive=True)]
            except self.psutil.Error:  # a worker ended between the listing and the read
                continue
            self.pss = max(self.pss, own + sum(w.pss for w in workers))
            self.worker_uss = max([self.worker_uss, *(w.uss for w in workers)])

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        return {"pss_mb": self.pss / 2**20, "worker_uss_mb": self.worker_uss / 2**20,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(kind: str, path: str, resolution: int) -> None:
    """One whole trial as a Ray worker runs it (load, one epoch of the tiny model, the last epoch's probe
    and k-NN); prints its peak memory (MB) and timings as JSON."""
    from mae_search.config import TrainConfig
    from mae_search.training.train import Trainer

    torch.set_num_threads(1)
    memory = PeakMemory()
    start = time.perf_counter()
    cfg = TrainConfig.model_validate({
        "model": {"img_size": resolution, **TINY_MODEL}, "batch_size": 64, "epochs": 1, "device": "cpu",
        "data": data_config(kind, Path(path), decode_workers=2),
        "eval": {"probe": {"epochs": 2}, "finetune": {"at": "never"}}})
    trainer = Trainer(cfg)
    next(iter(trainer.epoch_inputs(torch.Generator().manual_seed(0))))
    first = time.perf_counter() - start
    [metrics] = trainer.fit()
    print(json.dumps({**memory.stop(), "first_batch_s": first, "trial_s": time.perf_counter() - start,
                      "eval_train_images": metrics["eval_train_images"]}))


def measure(kind: str, path: Path, resolution: int, repeats: int = 3) -> dict:
    """The median of each number over ``repeats`` fresh trials: one trial's peak memory varies by about
    +-100 MB from run to run (allocator state, which pages the sampler catches), more than the
    differences between data-set sizes being measured."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-m", "benchmarks.prepared_data", "--child", kind, str(path),
                              "--resolution", str(resolution)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


def growth(points: dict[int, tuple[dict, dict]], base: int, resolution: int) -> str:
    """One sentence: how each path's peak memory moved between the two largest sizes."""
    small, large = sorted(points)[-2:]
    added = (large - small) * base
    (mem_s, str_s), (mem_l, str_l) = points[small], points[large]
    return (f"From {small * base:,} to {large * base:,} images ({added:,} more: "
            f"{added * 3 * resolution**2 / 2**20:.0f} MB as decoded uint8) the in-memory trial's peak RSS moved "
            f"{mem_l['rss_mb'] - mem_s['rss_mb']:+.0f} MB, the streamed trial's "
            f"{str_l['rss_mb'] - str_s['rss_mb']:+.0f} MB (PSS with its decode workers "
            f"{str_l['pss_mb'] - str_s['pss_mb']:+.0f} MB).")


# --------------------------------------------------------------------------- throughput and input-bound


def decode_throughput(manifest_dir: Path, resolution: int, steps: int = 20) -> float:
    """Images/s of decode + crop/flip + normalise on the calling thread (one core)."""
    from mae_search.data.memory import crop_flip, draw_crop_flip, normalize
    from mae_search.data.shards import read_manifest
    from mae_search.data.stream import PreparedSet

    torch.set_num_threads(1)
    stream = PreparedSet(read_manifest(manifest_dir), "train", decode_workers=0, shuffle_shards=2)
    start = time.perf_counter()
    for batch, _ in stream.batches(64, steps, seed=0, epoch=0):
        crop_flip(normalize(batch), draw_crop_flip(len(batch)), (0.35, 1.0), True)
    return steps * 64 / (time.perf_counter() - start)


def input_bound(folder: Path, manifest_dir: Path, resolution: int) -> tuple[float, float]:
    """Epoch seconds of the tiny model with in-memory batches and with one decode worker streaming."""
    from mae_search.config import TrainConfig
    from mae_search.training.train import Trainer

    torch.set_num_threads(1)
    times = []
    for kind, path in (("imagefolder", folder), ("prepared", manifest_dir)):
        cfg = TrainConfig.model_validate({"model": {"img_size": resolution, **TINY_MODEL}, "batch_size": 64,
                                          "epochs": 1, "data": data_config(kind, path, decode_workers=1)})
        trainer = Trainer(cfg, device=torch.device("cpu"))
        start = time.perf_counter()
        trainer.train_one_epoch()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


# --------------------------------------------------------------------------- a 4-trial search per path


def search_cost(kind: str, path: Path, resolution: int, storage: Path) -> tuple[float, float]:
    """Wall seconds and CPU-seconds (the whole machine's, which runs nothing else) of a 4-trial grid search."""
    import psutil

    storage.mkdir(parents=True, exist_ok=True)
    space = storage / f"{kind}.yaml"
    space.write_text(json.dumps({
        "name": f"data-{kind}",
        "base": {"epochs": 1, "batch_size": 64, "model": {"img_size": resolution, **TINY_MODEL},
                 "data": data_config(kind, path, decode_workers=1),
                 "eval": {"probe": {"epochs": 2}, "grid_images": 4, "finetune": {"at": "never"}}},
        "dimensions": {"masking.mask_ratio": {"grid": [0.6, 0.7, 0.75, 0.8]}},
        "metric": "loss", "mode": "min", "scheduler": {"type": "none"}, "max_concurrent_trials": 2,
    }))
    before = psutil.cpu_times()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mae_search.cli", "search", str(space), "--storage", str(storage),
                    "--num-cpus", "2", "--no-mlflow"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = psutil.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=1000, help="images at 1x")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="data-set sizes, in multiples of --base (4x is used for the throughput and search parts)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--no-search", action="store_true", help="skip the 4-trial searches (about 3 minutes)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.resolution)
        return
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets, prepare_s = {}, {}
        for factor in sorted(set(args.factors) | {1, 4}):
            folder = write_folder(tmp / f"folder{factor}", args.base * factor)
            start = time.perf_counter()
            sets[factor] = (folder, prepare_in_process(folder, tmp / f"prepared{factor}", args.resolution))
            prepare_s[factor] = time.perf_counter() - start
        points = {}
        for factor, (folder, prepared) in sets.items():
            memory = measure("imagefolder", folder, args.resolution)
            stream = measure("prepared", prepared, args.resolution)
            points[factor] = memory, stream
            rows.append(f"| {args.base * factor} | {memory['rss_mb']:.0f} | {memory['pss_mb']:.0f} "
                        f"| {stream['rss_mb']:.0f} | {stream['pss_mb']:.0f} | {stream['worker_uss_mb']:.0f} "
                        f"| {memory['first_batch_s']:.1f} | {stream['first_batch_s']:.1f} "
                        f"| {memory['trial_s']:.0f} | {stream['trial_s']:.0f} | {stream['eval_train_images']:.0f} |")
        per_core = decode_throughput(sets[1][1], args.resolution)
        in_memory_s, streamed_s = input_bound(*sets[4], args.resolution)
        lines += [
            f"Generated JPEG ImageFolder (10 classes, 64-96 px sources, about 4 KB each), prepared at "
            f"{args.resolution} px in shards of 500; {machine()}.", "",
            "One whole trial per row (tiny model, one epoch, then the probe and k-NN; in memory on 1,000 "
            "labelled images, streamed on every labelled image, as `final_eval: full` does at the last epoch); "
            "each number the median of 3 trials.",
            "",
            "Memory in MB: peak RSS of the trial's process; peak PSS summed over the process and its decode "
            "workers (shared pages counted once: what the trial costs the machine); the largest decode worker's "
            "unique memory (USS).", "",
            "| train images | in memory: RSS | in memory: PSS | streamed: RSS | streamed: PSS with workers | "
            "streamed: worker USS | in memory: first batch (s) | streamed: first batch (s) | in memory: trial (s) "
            "| streamed: trial (s) | streamed: images probed |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            growth(points, args.base, args.resolution), "",
            f"Decode + crop/flip + normalise on one core: {per_core:.0f} images/s.",
            f"Tiny model, one epoch of {args.base * 4} images on one thread: in memory {in_memory_s:.1f} s, "
            f"streamed through one decode worker {streamed_s:.1f} s "
            f"(streamed / in memory = {streamed_s / in_memory_s:.2f}).",
        ]
        print("\n".join(lines), flush=True)
        if not args.no_search:
            folder, prepared = sets[4]
            decoded = search_cost("imagefolder", folder, args.resolution, tmp / "s1")
            streamed = search_cost("prepared", prepared, args.resolution, tmp / "s2")
            lines += ["", f"4-trial search on {args.base * 4} images (two at a time, one epoch each): "
                      f"decode per trial {decoded[0]:.0f} s wall, {decoded[1]:.0f} CPU-s; prepared once and "
                      f"streamed {streamed[0]:.0f} s wall, {streamed[1]:.0f} CPU-s (wall ratio "
                      f"{streamed[0] / decoded[0]:.2f}, CPU ratio {streamed[1] / decoded[1]:.2f}). Preparing "
                      f"the set once took {prepare_s[4]:.0f} s on one core (in this process; `mae-search "
                      f"prepare` runs the shards as parallel Ray tasks)."]
    text = "\n".join(lines)
    print(text)
    write_section("prepared_data", "## Prepared, streamed data against decoding in memory\n\n"
                  "`python -m benchmarks.prepared_data`\n\n" + text)


if __name__ == "__main__":
    main()
