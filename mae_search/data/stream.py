"""Input pipelines: batches of images (and labels) from memory or streamed from a prepared set.

A prepared set streams: memory is set by a prefetch budget, not by the data set.
Each epoch, the shards of a split are put in an order drawn from (seed, epoch);
rank r of w takes every w-th of them, so ranks read disjoint shards and a
resumed epoch reads what the uninterrupted one did. A rank's shards are read
by ``decode_workers`` DataLoader processes (decoding never runs on the
training thread), each holding at most ``shuffle_shards`` shards of JPEG
bytes, shuffled together, and decoding only the batch it is about to yield.
Every rank yields exactly the epoch's step count (cycling its shards if they
hold fewer images), so DDP ranks never wait on each other.

Evaluation passes (features for the probe and k-NN, a classifier's accuracy)
read a split once, in shard order. Until the last epoch they use the first
``data.eval_images`` images of each labelled split, decoded into memory (the
same images for every trial); at the last epoch, with
``data.final_eval: full``, they stream every labelled image.

A :class:`PreparedSet` reads like an in-memory :class:`~mae_search.data.memory.ImageSet`:
``shuffled`` and ``in_order`` are the two ways any loop (pre-training,
fine-tuning, evaluation) reads a split, whichever kind it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mae_search.data.memory import DataError, ImageSet, check_steps, draw_crop_flip
from mae_search.data.shards import Manifest, decode, read_manifest, read_shard

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, C, H, W), int64 labels (B,)


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


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _decode_batch(pool: list[tuple[bytes, int, str]]) -> Batch:
    images = np.stack([decode(jpeg, where) for jpeg, _, where in pool])
    return torch.from_numpy(images), torch.tensor([label for _, label, _ in pool], dtype=torch.int64)


@dataclass
class _RankStream(IterableDataset):
    """What both streams read: one split of a prepared set, in batches, as rank ``rank`` of ``world_size``."""

    manifest: Manifest
    split: str
    batch_size: int
    rank: int = field(default=0, kw_only=True)
    world_size: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        super().__init__()


@dataclass
class EpochStream(_RankStream):
    """One rank's shuffled (images, labels) batches for one epoch: ``steps`` of them in all, across workers."""

    steps: int
    seed: int
    epoch: int
    shuffle_shards: int = 4

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        shards = self.manifest.splits[self.split]
        mine = rank_shards(len(shards), self.seed, self.epoch, self.rank, self.world_size)
        # DataLoader takes batches from its workers in turn: worker k yields batches k, k + workers, ...
        todo = len(range(worker, self.steps, workers))
        if todo == 0:
            return
        mine = mine[worker::workers] or mine[worker % len(mine):] + mine[: worker % len(mine)]
        gen = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        carry: list[tuple[bytes, int, str]] = []
        position = 0
        while todo:
            group = [mine[(position + i) % len(mine)] for i in range(self.shuffle_shards)]
            position += self.shuffle_shards
            pool = list(carry)
            for s in dict.fromkeys(group):  # a shard once per group even when a rank has fewer shards
                pool += _shard_rows(self.manifest, shards[s])
            order = gen.permutation(len(pool))
            usable = len(order) // self.batch_size * self.batch_size
            for start in range(0, usable, self.batch_size):
                yield _decode_batch([pool[i] for i in order[start:start + self.batch_size]])
                todo -= 1
                if not todo:
                    return
            carry = [pool[i] for i in order[usable:]]


def _shard_rows(manifest: Manifest, shard: dict) -> list[tuple[bytes, int, str]]:
    """(JPEG bytes, label, where) of every image of a shard; ``where`` names it in an error."""
    images, labels = read_shard(manifest, shard)
    return [(jpeg, int(label), f"{manifest.root / shard['file']} row {row}")
            for row, (jpeg, label) in enumerate(zip(images, labels, strict=True))]


@dataclass
class OrderedStream(_RankStream):
    """Every image of one rank's shards (rank r of w: shards r, r + w, ...) once, in shard order."""

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        shards = self.manifest.splits[self.split][self.rank::self.world_size]
        for shard in shards[worker::workers]:
            rows = _shard_rows(self.manifest, shard)
            for start in range(0, len(rows), self.batch_size):
                yield _decode_batch(rows[start:start + self.batch_size])


def _release_shard_buffers(worker_id: int) -> None:
    """Parquet reads in a decode worker allocate from the system's allocator, not Arrow's default
    (mimalloc), which keeps freed shard buffers: streaming three epochs of 16,000 images, a process's
    unique memory wandered between +79 and +112 MB with mimalloc and stayed within +63 to +70 MB with
    the system allocator."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


class PreparedSet:
    """One split of a prepared set, streamed: what a loop iterates instead of an in-memory ImageSet."""

    def __init__(self, manifest: Manifest, split: str, decode_workers: int, shuffle_shards: int) -> None:
        self.manifest, self.split = manifest, split
        self.decode_workers, self.shuffle_shards = decode_workers, shuffle_shards

    def __len__(self) -> int:
        return self.manifest.images(self.split)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest.classes)

    def to(self, device: torch.device) -> PreparedSet:
        return self  # batches move to the device one at a time

    def _loader(self, stream: IterableDataset) -> DataLoader:
        workers = self.decode_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=2 if workers else None, multiprocessing_context="fork" if workers else None,
                          worker_init_fn=_release_shard_buffers if workers else None)

    def shuffled(self, batch_size: int, steps: int, gen: torch.Generator, seed: int, epoch: int,
                 device: torch.device, rank: int = 0, world_size: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's (uint8 images, labels, crop/flip uniforms) for ``steps`` steps of an epoch, on the
        device: batches streamed from decode workers, pinned and copied without blocking; the uniforms
        drawn from ``gen`` as in memory."""
        check_steps(len(self), batch_size, steps)
        uniforms = draw_crop_flip(steps * batch_size, gen).to(device).split(batch_size)
        loader = self.batches(batch_size, steps, seed, epoch, rank, world_size)
        return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True), u)
                for (x, y), u in zip(loader, uniforms, strict=True))

    def batches(self, batch_size: int, steps: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> DataLoader:
        """``steps`` shuffled (images, labels) batches of this rank's shards for one epoch."""
        return self._loader(EpochStream(self.manifest, self.split, batch_size, steps, seed, epoch,
                                        self.shuffle_shards, rank=rank, world_size=world_size))

    def in_order(self, batch_size: int = 256, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Every image of this rank's shards once, with its label (an evaluation pass)."""
        return self._loader(OrderedStream(self.manifest, self.split, batch_size, rank=rank,
                                          world_size=world_size))


Labelled = ImageSet | PreparedSet


@dataclass
class DataSplits:
    """What a trial reads. ``pretrain`` feeds MAE (in memory, or streamed from a prepared set);
    ``train``/``test`` are the labelled splits for probing, k-NN and fine-tuning, in memory, and ``val``
    the validation images carved from the labelled training ones (none of them in ``train`` or
    ``full_train``). A prepared set also gives its whole labelled splits, streamed
    (``full_train``/``full_test``), for the last epoch's evaluation."""

    pretrain: Labelled
    train: ImageSet
    test: ImageSet
    full_train: PreparedSet | None = None
    full_test: PreparedSet | None = None
    val: ImageSet | None = None  # carved from the labelled training images: what a search selects on

    def labelled(self, final: bool) -> tuple[Labelled, Labelled]:
        """The (train, test) an evaluation uses: the whole splits at the last epoch where there are
        streamed ones, else the in-memory ones."""
        train, test = self.train, self.test
        if final:
            train = self.full_train if self.full_train is not None else train
            test = self.full_test if self.full_test is not None else test
        return train, test

    def scored(self, final: bool, test_every_eval: bool = False) -> tuple[Labelled, dict[str, Labelled]]:
        """(labelled training images, the splits an evaluation scores by name): the validation split every
        time, what a search selects on; the test split at the last epoch only (or every time when asked),
        so no searcher or scheduler sees it. Trials and reference rows both call this."""
        train, test = self.labelled(final)
        targets: dict[str, Labelled] = {"val": self.val} if self.val is not None else {}
        if final or not targets or test_every_eval:
            targets["test"] = test
        return train, targets


def load_labelled(manifest: Manifest, split: str, limit: int) -> ImageSet:
    """The first ``limit`` images of a labelled split, decoded into memory (the same for every trial)."""
    images, labels = [], []
    for shard in manifest.splits[split]:
        for jpeg, label, where in _shard_rows(manifest, shard)[: limit - len(images)]:
            images.append(decode(jpeg, where))
            labels.append(label)
        if len(images) == limit:
            break
    if not images:
        raise DataError(f"prepared: split '{split}' of {manifest.root} holds no images")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64),
                    tuple(manifest.classes))


def load_prepared(path: str, size: int, eval_images: int, decode_workers: int, shuffle_shards: int,
                  val_count: Callable[[int], int] | None = None) -> DataSplits:
    """Streamed pre-training split, in-memory labelled subsets, the streamed whole labelled splits, and
    the validation images (``val_count(labelled images)`` of them) from the train split's first shards."""
    manifest = read_manifest(path)
    if manifest.resolution != size:
        raise DataError(f"prepared: {manifest.root} holds {manifest.resolution} px images but model.img_size is "
                        f"{size} (prepare it again with --resolution {size}, or set model.img_size)")
    test = test_split(manifest)
    pretrain = PreparedSet(manifest, pretrain_split(manifest), decode_workers, shuffle_shards)
    val = None
    if val_count is not None:
        manifest = validation_shards(manifest, val_count(manifest.images("train")))
        val = load_labelled(manifest, VAL_SPLIT, manifest.images(VAL_SPLIT))

    def streamed(split: str) -> PreparedSet:
        return PreparedSet(manifest, split, decode_workers, shuffle_shards)

    return DataSplits(pretrain, load_labelled(manifest, "train", eval_images),
                      load_labelled(manifest, test, eval_images), streamed("train"), streamed(test), val)


VAL_SPLIT = "validation (carved from train)"


def validation_shards(manifest: Manifest, count: int) -> Manifest:
    """The manifest with the train split's first whole shards holding at least ``count`` images moved to
    a validation split. Whole shards, so every reader of the train split (the streamed last-epoch
    evaluation and fine-tuning included) leaves them out without knowing about them; the same shards
    for every seed."""
    shards = manifest.splits["train"]
    taken, held = [], 0
    while held < count and len(taken) < len(shards) - 1:
        taken.append(shards[len(taken)])
        held += taken[-1]["images"]
    if held < count:
        raise DataError(f"prepared: {manifest.root}'s train split has {len(shards)} shard(s); the validation "
                        f"split ({count} images) needs whole shards and at least one left to train on (prepare "
                        "it with smaller shards, or lower data.val_split)")
    return replace(manifest, splits={**manifest.splits, "train": shards[len(taken):], VAL_SPLIT: taken})
