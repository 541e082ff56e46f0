"""GPU checks that are not a trainer micro-benchmark: a search placing trials on one GPU, and the
streamed prepared-data path feeding a ViT-B/16 step.

    python -m benchmarks.gpu_checks search   # 2 trials sharing the GPU (0.5 each), then 1 with all of it
    python -m benchmarks.gpu_checks stream   # decode workers' images/s against the training step's

Both write a section of RESULTS.md. ``--device cpu`` (with ``--gpus 0`` for the search) runs the same
code on a small model so the script can be tried on a machine without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import machine, throughput, write_section

SEARCH_TIMEOUT_S = 150  # each search; a trial that waits forever for its GPU share fails the check here


class GpuProcesses:
    """Polls ``nvidia-smi`` every 0.3 s from a thread: the most processes holding the GPU at once."""

    def __init__(self) -> None:
        self.most, self.seen = 0, set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.3):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return  # no nvidia-smi: a CPU try-out
            pids = {line.strip() for line in out.splitlines() if line.strip().isdigit()}
            self.seen |= pids
            self.most = max(self.most, len(pids))

    def stop(self) -> tuple[int, int]:
        self.done.set()
        self.thread.join()
        return self.most, len(self.seen)


def search_space(name: str, ratios: list[float], gpus: float, concurrent: int, cpus: float) -> dict:
    """A small real search on the embedded set: 2 epochs, probe, k-NN and a short fine-tuning, one seed."""
    return {
        "name": name,
        "base": {"epochs": 2, "batch_size": 128,
                 "data": {"num_train": 4000, "num_labelled": 1000, "num_test": 500},
                 "eval": {"probe": {"epochs": 20}, "finetune": {"epochs": 2}}},
        "dimensions": {"masking.mask_ratio": {"grid": ratios}},
        "metric": "val_linear_probe_acc", "mode": "max", "seeds": [0],
        "scheduler": {"type": "none"}, "max_concurrent_trials": concurrent,
        "resources": {"workers": 1, "cpus_per_worker": cpus, "gpus_per_worker": gpus},
    }


def run_search(space: dict, storage: Path) -> dict:
    """Run one search through the CLI (local Ray, no MLflow); what a researcher would check afterwards."""
    from mae_search.search.record import Status
    from mae_search.search.results import final_rows, read_results, reference_rows

    path = storage / f"{space['name']}.yaml"
    path.write_text(json.dumps(space))
    gpu = GpuProcesses()
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "mae_search.cli", "search", str(path), "--storage",
                               str(storage), "--no-mlflow"], capture_output=True, text=True,
                              timeout=SEARCH_TIMEOUT_S)
        returncode, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        returncode, tail = "timeout", str(exc.stdout or "")[-3000:]
    wall = time.perf_counter() - start
    most, seen = gpu.stop()
    print(f"--- {space['name']}: exit {returncode} after {wall:.0f} s\n{tail}", flush=True)
    summary = {"name": space["name"], "exit": returncode, "wall_s": wall, "most_on_gpu": most, "gpu_pids": seen,
               "gpus_per_worker": space["resources"]["gpus_per_worker"], "trials": 0, "finished": 0,
               "checkpoints": 0, "references": 0, "val_lp": [], "test_lp": []}
    try:
        df = read_results(storage / space["name"], with_references=True)
    except Exception as exc:  # noqa: BLE001 - a missing table is the finding, reported in the row
        print(f"no results table: {exc}")
        return summary
    final = final_rows(df)
    summary.update(trials=len(final), finished=int((final["status"] == Status.COMPLETED).sum()),
                   checkpoints=sum(Path(str(p)).exists() for p in final.get("checkpoint_path", [])),
                   references=len(reference_rows(df)),
                   val_lp=[round(100 * v, 1) for v in final.get("val_linear_probe_acc", [])],
                   test_lp=[round(100 * v, 1) for v in final.get("linear_probe_acc", [])])
    return summary


def search_check(gpus: float, cpus: float) -> str:
    shared = search_space("gpu-shared", [0.6, 0.75], gpus / 2, concurrent=2, cpus=cpus)
    whole = search_space("gpu-whole", [0.75], gpus, concurrent=1, cpus=cpus)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_search(space, Path(tmp)) for space in (shared, whole)]
    lines = [
        "## A search on one GPU",
        "",
        f"Machine: {machine()}. `python -m benchmarks.gpu_checks search`: the embedded set, default model, "
        "2 epochs over 4,000 images, probe, k-NN and 2 epochs of fine-tuning, one seed, local Ray, no MLflow. "
        "'most on GPU at once' is the largest number of processes nvidia-smi listed on the GPU while the "
        "search ran (trials and the reference rows' tasks).",
        "",
        "| search | GPU per trial | exit | wall (s) | trials finished | checkpoints on disk | reference rows "
        "| most on GPU at once | processes that used the GPU | val LP % | test LP % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['gpus_per_worker']:g} | {r['exit']} | {r['wall_s']:.0f} | "
                     f"{r['finished']} of {r['trials']} | {r['checkpoints']} | {r['references']} | "
                     f"{r['most_on_gpu']} | {r['gpu_pids']} | {r['val_lp']} | {r['test_lp']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- streamed data into the GPU


def feed_rate(manifest_dir: Path, workers: int, batch: int, steps: int, device: torch.device) -> float:
    """Images/s the streamed pre-training loader delivers onto the device with ``workers`` decode processes
    (decode, pinned copy; the crop/flip runs on the device in the step and is timed there)."""
    from mae_search.data.shards import read_manifest
    from mae_search.data.stream import PreparedSet

    stream = PreparedSet(read_manifest(manifest_dir), "train", decode_workers=workers, shuffle_shards=2)
    gen = torch.Generator().manual_seed(0)
    batches = stream.shuffled(batch, steps, gen, seed=0, epoch=0, device=device)
    next(batches)  # workers started, first shards read
    start = time.perf_counter()
    count = 0
    for images, _, _ in batches:
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def step_rate(preset: str, batch: int, device: torch.device, compile_: bool) -> float:
    from benchmarks.trainer_throughput import make_trainer, trainer_step
    from mae_search.config import model_preset
    from mae_search.data.memory import synthetic_shapes

    cfg = model_preset(preset)
    imgs = synthetic_shapes(batch, cfg.img_size, seed=0).images.to(device)
    trainer = make_trainer(cfg, batch, device.type, compile_=compile_)
    return throughput(trainer_step(trainer, imgs), batch, device, warmup=5, repeats=20)


def stream_check(device: torch.device, preset: str, images: int, batch: int, workers: list[int]) -> str:
    from benchmarks.prepared_data import prepare_in_process, write_folder
    from mae_search.config import model_preset

    resolution = model_preset(preset).img_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folder = write_folder(tmp / "folder", images, val=50, size=(int(resolution * 1.2), int(resolution * 2)))
        prepared = prepare_in_process(folder, tmp / "prepared", resolution, shard_size=256)
        made_s = time.perf_counter() - start
        steps = images // batch - 1
        feeds = {k: feed_rate(prepared, k, batch, steps, device) for k in workers}
    step = step_rate(preset, batch, device, compile_=False)
    rows = [f"| {k} | {rate:.0f} | {rate / step:.2f} | {'yes' if rate < step else 'no'} |"
            for k, rate in feeds.items()]
    return "\n".join([
        "## Streamed prepared data feeding the GPU",
        "",
        f"Machine: {machine()}. `python -m benchmarks.gpu_checks stream`: {images} generated JPEGs "
        f"({int(resolution * 1.2)}-{resolution * 2} px sources) prepared at {resolution} px in shards of 256 "
        f"(writing and preparing took {made_s:.0f} s), then one epoch streamed by the trainer's loader "
        f"(decode workers, 2 shards shuffled each, pinned copies to the device), batch {batch}. The step: "
        f"mae_search's `{preset}` train step (bf16, SDPA, fused AdamW, no compile) on batches already on the "
        f"device, {step:.0f} img/s.",
        "",
        "| decode workers | images/s delivered | / step's img/s | input-bound |",
        "|---|---|---|---|",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["search", "stream"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", type=float, default=1.0, help="search: GPUs for the whole-GPU trial")
    parser.add_argument("--cpus", type=float, default=4.0, help="search: CPUs per trial")
    parser.add_argument("--preset", default="vit-b16")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    record = write_section if torch.cuda.is_available() else lambda _, text: print(text)  # CPU: a try-out
    if args.check == "search":
        record("gpu-search", search_check(args.gpus, args.cpus))
    else:
        record("gpu-stream", stream_check(torch.device(args.device), args.preset, args.images, args.batch,
                                          args.workers))


if __name__ == "__main__":
    main()
