"""Streaming input from a prepared data set: memory set by a prefetch budget, not by the data set.

Each epoch, the shards of the pre-training split are put in an order drawn
from (seed, epoch); rank r of w takes every w-th of them, so ranks read
disjoint shards and a resumed epoch reads what the uninterrupted one did.
A rank's shards are read by ``decode_workers`` DataLoader processes (decoding
never runs on the training thread), each holding at most ``shuffle_shards``
shards of JPEG bytes, shuffled together, and decoding only the batch it is
about to yield. Every rank yields exactly the epoch's step count (cycling its
shards if they hold fewer images), so DDP ranks never wait on each other.

The labelled splits (probe, k-NN, fine-tuning, reconstruction grids) are
small by comparison: ``data.eval_images`` of each are decoded into memory
(the first shards; the same images for every trial).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mae_search.data import DataError, ImageSet
from mae_search.prepare import Manifest, decode, read_manifest, read_shard


def pretrain_split(manifest: Manifest) -> str:
    """STL-10's unlabelled split when it was prepared, else train."""
    return "unlabeled" if "unlabeled" in manifest.splits else "train"


def test_split(manifest: Manifest) -> str:
    found = next((s for s in ("val", "test") if s in manifest.splits), None)
    if found is None:
        raise DataError(f"prepared: {manifest.root} has no val or test split for evaluation")
    return found


def shard_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order, the same on every rank and after a resume."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 7_919 + 1)
    return torch.randperm(n, generator=gen).tolist()


def rank_shards(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's shards this epoch (all of them, rotated, when there are fewer shards than ranks)."""
    order = shard_order(n, seed, epoch)
    mine = order[rank::world_size]
    return mine or order[rank % n:] + order[: rank % n]


@dataclass
class EpochStream(IterableDataset):
    """One rank's uint8 (B, C, H, W) batches for one epoch: ``steps`` of them in all, across workers."""

    manifest: Manifest
    split: str
    batch_size: int
    steps: int
    seed: int
    epoch: int
    rank: int = 0
    world_size: int = 1
    shuffle_shards: int = 4

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.manifest.splits[self.split]
        mine = rank_shards(len(shards), self.seed, self.epoch, self.rank, self.world_size)
        # DataLoader takes batches from its workers in turn: worker k yields batches k, k + workers, ...
        todo = len(range(worker, self.steps, workers))
        if todo == 0:
            return
        mine = mine[worker::workers] or mine[worker % len(mine):] + mine[: worker % len(mine)]
        gen = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        carry: list[tuple[bytes, str]] = []
        position = 0
        while todo:
            group = [mine[(position + i) % len(mine)] for i in range(self.shuffle_shards)]
            position += self.shuffle_shards
            pool = list(carry)
            for s in dict.fromkeys(group):  # a shard once per group even when a rank has fewer shards
                images, _ = read_shard(self.manifest, shards[s])
                pool += [(jpeg, f"{self.manifest.root / shards[s]['file']} row {row}")
                         for row, jpeg in enumerate(images)]
            order = gen.permutation(len(pool))
            usable = len(order) // self.batch_size * self.batch_size
            for start in range(0, usable, self.batch_size):
                batch = [pool[i] for i in order[start:start + self.batch_size]]
                yield torch.from_numpy(np.stack([decode(jpeg, where) for jpeg, where in batch]))
                todo -= 1
                if not todo:
                    return
            carry = [pool[i] for i in order[usable:]]


class PreparedSet:
    """The pre-training split of a prepared set, streamed: what the trainer iterates instead of an ImageSet."""

    def __init__(self, manifest: Manifest, decode_workers: int, shuffle_shards: int) -> None:
        self.manifest = manifest
        self.split = pretrain_split(manifest)
        self.decode_workers, self.shuffle_shards = decode_workers, shuffle_shards

    def __len__(self) -> int:
        return self.manifest.images(self.split)

    def to(self, device: torch.device) -> PreparedSet:
        return self  # batches move to the device one at a time

    def batches(self, batch_size: int, steps: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> DataLoader:
        stream = EpochStream(self.manifest, self.split, batch_size, steps, seed, epoch, rank, world_size,
                             self.shuffle_shards)
        workers = self.decode_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=2 if workers else None, multiprocessing_context="fork" if workers else None)


def load_labelled(manifest: Manifest, split: str, limit: int) -> ImageSet:
    """The first ``limit`` images of a labelled split, decoded into memory (the same for every trial)."""
    images, labels = [], []
    for shard in manifest.splits[split]:
        jpegs, ys = read_shard(manifest, shard)
        for row, (jpeg, y) in enumerate(zip(jpegs, ys, strict=True)):
            if len(images) == limit:
                break
            images.append(decode(jpeg, f"{manifest.root / shard['file']} row {row}"))
            labels.append(int(y))
        if len(images) == limit:
            break
    if not images:
        raise DataError(f"prepared: split '{split}' of {manifest.root} holds no images")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64),
                    tuple(manifest.classes))


def load_prepared(path: str, size: int, eval_images: int, decode_workers: int, shuffle_shards: int
                  ) -> tuple[PreparedSet, ImageSet, ImageSet]:
    """Streamed pre-training split, and in-memory labelled train and test subsets."""
    manifest = read_manifest(path)
    if manifest.resolution != size:
        raise DataError(f"prepared: {manifest.root} holds {manifest.resolution} px images but model.img_size is "
                        f"{size} (prepare it again with --resolution {size}, or set model.img_size)")
    train = load_labelled(manifest, "train", eval_images)
    test = load_labelled(manifest, test_split(manifest), eval_images)
    return PreparedSet(manifest, decode_workers, shuffle_shards), train, test
