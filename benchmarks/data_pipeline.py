"""Data pipeline: on-device batched augmentation vs a per-sample torchvision DataLoader, same data.

Both produce normalised, randomly resized-cropped and flipped batches of the
embedded data set. The per-sample path is the classic recipe (PIL-free tensor
transforms applied image by image in DataLoader workers); the batched path is
what mae_search's trainer does: one uint8 tensor on the device, one
``grid_sample`` per batch. The trainer's step rate is printed beside them to
show whether training would be input-bound.

    python -m benchmarks.data_pipeline
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from benchmarks.common import machine, sync, write_section
from mae_search.data.memory import MEAN, STD, epoch_batches, normalize, random_resized_crop_flip, synthetic_shapes


class PerSampleShapes(Dataset):
    def __init__(self, images: torch.Tensor, size: int) -> None:
        self.images = images
        self.tf = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN.tolist(), STD.tolist()),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tf(self.images[i])


def per_sample_rate(images: torch.Tensor, batch: int, workers: int) -> float:
    loader = DataLoader(PerSampleShapes(images, images.shape[-1]), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch (starts the workers)
        pass
    start = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - start)


def batched_rate(images: torch.Tensor, batch: int, device: torch.device) -> float:
    data = images.to(device)
    gen = torch.Generator().manual_seed(0)

    def epoch() -> int:
        n = 0
        for idx in epoch_batches(len(data), batch, gen):
            out = random_resized_crop_flip(normalize(data[idx.to(device)]), (0.35, 1.0), True, gen)
            n += len(out)
        sync(device)
        return n

    epoch()
    start = time.perf_counter()
    n = epoch()
    return n / (time.perf_counter() - start)


def trainer_rate(batch: int, device: torch.device) -> float:
    """Images/s the tiny model's real training step consumes (augmentation excluded)."""
    from benchmarks.common import throughput
    from mae_search.config import TrainConfig
    from mae_search.training.train import Trainer

    trainer = Trainer(TrainConfig(batch_size=batch, data={"num_train": batch, "num_test": 16}), device=device)
    imgs = normalize(trainer.data.pretrain.images)
    return throughput(lambda: trainer.train_step(imgs, 0.75, measure=False, update=True), batch, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = synthetic_shapes(args.images, 32, seed=0).images
    batched = batched_rate(images, args.batch, device)
    per_sample = per_sample_rate(images, args.batch, args.workers)
    per_sample_main = per_sample_rate(images, args.batch, 0)
    consumed = trainer_rate(args.batch, device)
    write_section("data-pipeline", "\n".join([
        "## Data pipeline (embedded data set, 32 px)",
        "",
        f"Machine: {machine()}. {args.images} images, batch {args.batch}, random resized crop + flip + normalise; "
        "one run of `python -m benchmarks.data_pipeline`.",
        "",
        "| pipeline | img/s | ratio |",
        "|---|---|---|",
        f"| torchvision per-sample transforms, DataLoader with {args.workers} workers | {per_sample:.0f} | 1.00 |",
        f"| torchvision per-sample transforms, DataLoader in the main process | {per_sample_main:.0f} | "
        f"{per_sample_main / per_sample:.2f} |",
        f"| mae_search: uint8 tensor on {device.type}, one grid_sample per batch | {batched:.0f} | "
        f"{batched / per_sample:.2f} |",
        "",
        f"The tiny model's training step consumes {consumed:.0f} img/s on the same machine: the batched "
        f"pipeline supplies {batched / consumed:.0f}x that, so it takes {100 * consumed / batched:.1f}% of a step "
        "and training is not input-bound.",
    ]))


if __name__ == "__main__":
    main()
