"""Prepared data sets: an image source converted once into Parquet shards and a manifest.

A data set too large to decode into memory per trial (ImageNet, ImageNet-100)
is prepared once, in parallel Ray tasks, and read back shard by shard.

Layout of ``mae-search prepare SOURCE OUT``::

    OUT/manifest.json                  format, resolution, classes, and per split its shards
    OUT/<split>/shard-00000.parquet    columns: image (JPEG, resolution x resolution RGB),
                                       label (int64; -1 unlabelled), key (source path or index)
    OUT/<split>/shard-00000.json       the shard's receipt: images, SHA-256 of the Parquet file,
                                       fingerprint of its inputs and settings, unreadable images

A shard is written whole, then its receipt; a rerun keeps every shard whose
receipt matches its planned inputs and whose file still has the recorded
checksum (verified in the tasks, in parallel), and makes the others again. An
unreadable source image is skipped, named in the receipt and the manifest, and
counted; it does not stop the run. The images are stored as the in-memory
ImageFolder path sees them (shorter side resized, centre crop), JPEG-encoded.
The embedded generated set (``synthetic_shapes``) can be prepared too, as the
images a search of seed 0 generates, so the streamed path runs without a
download (``search_spaces/imagenet100_tiny.yaml``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mae_search.data import DataError
from mae_search.storage import Location

FORMAT = "mae-search-prepared/1"
MANIFEST = "manifest.json"
SourceKind = Literal["imagefolder", "stl10", "cifar10", "synthetic_shapes"]
NATIVE_RESOLUTION = {"stl10": 96, "cifar10": 32, "imagefolder": 224, "synthetic_shapes": 32}
SYNTHETIC = "synthetic_shapes"  # the SOURCE that names the embedded generated set instead of a directory
SYNTHETIC_SEEDS = {"train": 10_000, "test": 20_000}  # the in-memory set's for seed 0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class PrepareSettings:
    """What a prepared set was made with; part of every shard's fingerprint, so changing it remakes them."""

    kind: SourceKind
    root: str
    resolution: int
    quality: int = 90
    synthetic_images: int | None = None  # synthetic_shapes only: training images (the test split is 1/8)


@dataclass(frozen=True)
class ShardPlan:
    """One shard to make: its split and index, and its inputs (relative file paths with labels for an
    ImageFolder, an index range for the array formats)."""

    split: str
    index: int
    items: tuple[tuple[str, int], ...] = ()
    start: int = 0
    stop: int = 0

    @property
    def stem(self) -> str:
        return f"{self.split}/shard-{self.index:05d}"

    def fingerprint(self, settings: PrepareSettings) -> str:
        chosen = {k: v for k, v in asdict(settings).items() if v is not None}  # unset fields leave it unchanged
        inputs = {"items": self.items, "range": [self.start, self.stop], "settings": chosen}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class Receipt:
    """A finished shard: written after its Parquet file, so a shard without one is unfinished."""

    file: str
    images: int
    sha256: str
    fingerprint: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    reused: bool = False


# --------------------------------------------------------------------------- sources


def detect_kind(root: Path) -> SourceKind:
    """The source's format from its layout (STL-10 binary, CIFAR-10 python batches, or class folders)."""
    if (root / "stl10_binary").is_dir() or (root / "train_X.bin").is_file():
        return "stl10"
    if (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").is_file():
        return "cifar10"
    if (root / "train").is_dir():
        return "imagefolder"
    raise DataError(f"prepare: {root} is not an ImageFolder tree (train/, val/), STL-10 or CIFAR-10 directory")


def imagefolder_splits(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes (train's folder names, sorted, as torchvision's ImageFolder) and each split's (path, label)."""
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"prepare: {root / 'train'} has no class folders")
    index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        items = []
        for class_dir in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"prepare: {class_dir} is a class that train/ does not have")
            items += [(str(f.relative_to(root)), index[class_dir.name]) for f in sorted(class_dir.rglob("*"))
                      if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        if not items:
            raise DataError(f"prepare: no images under {root / split}")
        splits[split] = items
    return classes, splits


def _stl_root(root: Path) -> Path:
    return root / "stl10_binary" if (root / "stl10_binary").is_dir() else root


def _cifar_root(root: Path) -> Path:
    return root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root


def synthetic_counts(settings: PrepareSettings) -> dict[str, int]:
    train = settings.synthetic_images or 8000
    return {"train": train, "test": max(16, train // 8)}


@functools.cache
def _synthetic_split(split: str, count: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole generated split (its images depend on its size, so a shard cannot be generated alone);
    cached, as a task process makes several shards of it."""
    from mae_search.data import synthetic_shapes

    data = synthetic_shapes(count, resolution, seed=SYNTHETIC_SEEDS[split])
    return data.images.permute(0, 2, 3, 1).contiguous().numpy(), data.labels.numpy()


def array_splits(settings: PrepareSettings) -> tuple[list[str], dict[str, int]]:
    """Classes and image counts per split of the array formats (read from the file sizes and headers)."""
    kind, root = settings.kind, Path(settings.root)
    if kind == SYNTHETIC:
        from mae_search.data import SHAPE_CLASSES

        return list(SHAPE_CLASSES), synthetic_counts(settings)
    if kind == "stl10":
        stl = _stl_root(root)
        names = stl / "class_names.txt"
        classes = names.read_text().split() if names.is_file() else [str(i) for i in range(10)]
        counts = {}
        for split, file in (("train", "train_X.bin"), ("test", "test_X.bin"), ("unlabeled", "unlabeled_X.bin")):
            path = stl / file
            if path.is_file():
                if path.stat().st_size % (3 * 96 * 96):
                    raise DataError(f"stl10: {path} is truncated or not an STL-10 image file")
                counts[split] = path.stat().st_size // (3 * 96 * 96)
        if "train" not in counts:
            raise DataError(f"stl10: missing file {stl / 'train_X.bin'}")
        return classes, counts
    from mae_search.data import _unpickle

    cifar = _cifar_root(root)
    return list(_unpickle(cifar / "batches.meta")["label_names"]), {"train": 50_000, "test": 10_000}


def plan_shards(settings: PrepareSettings, shard_size: int) -> tuple[list[str], list[ShardPlan]]:
    """Classes, and every shard of every split in a fixed order (the same plan on every rerun)."""
    root = Path(settings.root)
    plans: list[ShardPlan] = []
    if settings.kind == "imagefolder":
        classes, splits = imagefolder_splits(root)
        for split, items in splits.items():
            for i, start in enumerate(range(0, len(items), shard_size)):
                plans.append(ShardPlan(split, i, items=tuple(items[start:start + shard_size])))
        return classes, plans
    classes, counts = array_splits(settings)
    for split, count in counts.items():
        for i, start in enumerate(range(0, count, shard_size)):
            plans.append(ShardPlan(split, i, start=start, stop=min(count, start + shard_size)))
    return classes, plans


def _array_images(settings: PrepareSettings, plan: ShardPlan) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, H, W, 3) images and labels of an index range of STL-10 or CIFAR-10 (reading only that
    range) or of the generated set."""
    root = Path(settings.root)
    if settings.kind == SYNTHETIC:
        images, labels = _synthetic_split(plan.split, synthetic_counts(settings)[plan.split], settings.resolution)
        return images[plan.start:plan.stop], labels[plan.start:plan.stop]
    if settings.kind == "stl10":
        stl = _stl_root(root)
        file = {"train": "train_X.bin", "test": "test_X.bin", "unlabeled": "unlabeled_X.bin"}[plan.split]
        images = np.memmap(stl / file, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)[plan.start:plan.stop]
        images = np.ascontiguousarray(images.transpose(0, 3, 2, 1))  # stored column-major (C, W, H)
        if plan.split == "unlabeled":
            return images, np.full(len(images), -1, dtype=np.int64)
        labels = np.fromfile(stl / file.replace("_X", "_y"), dtype=np.uint8).astype(np.int64) - 1
        return images, labels[plan.start:plan.stop]
    from mae_search.data import _cifar_batch

    cifar = _cifar_root(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if plan.split == "train" else ["test_batch"]
    per_batch = 10_000
    parts, labels = [], []
    for b, name in enumerate(names):
        lo, hi = max(plan.start, b * per_batch), min(plan.stop, (b + 1) * per_batch)
        if lo < hi:
            data, y = _cifar_batch(cifar / name)
            parts.append(data.reshape(-1, 3, 32, 32)[lo - b * per_batch:hi - b * per_batch].transpose(0, 2, 3, 1))
            labels.append(y[lo - b * per_batch:hi - b * per_batch])
    return np.ascontiguousarray(np.concatenate(parts)), np.concatenate(labels)


# --------------------------------------------------------------------------- one shard (a Ray task)


def _jpeg(image: Any, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def encode_shard(settings: PrepareSettings, plan: ShardPlan) -> tuple[bytes, int, list[dict[str, str]]]:
    """The shard's Parquet bytes, its image count, and the source images that could not be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from mae_search.data import square_image

    square = square_image(settings.resolution)
    images, labels, keys, skipped = [], [], [], []
    if settings.kind == "imagefolder":
        root = Path(settings.root)
        for rel, label in plan.items:
            try:
                with Image.open(root / rel) as img:
                    sized = square(img.convert("RGB"))
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged file
                skipped.append({"path": str(root / rel), "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            images.append(_jpeg(sized, settings.quality))
            labels.append(label)
            keys.append(rel)
    else:
        pixels, ys = _array_images(settings, plan)
        for i, (array, label) in enumerate(zip(pixels, ys, strict=True)):
            images.append(_jpeg(square(Image.fromarray(array)), settings.quality))
            labels.append(int(label))
            keys.append(str(plan.start + i))
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                      "key": pa.array(keys, pa.string())})
    out = io.BytesIO()
    pq.write_table(table, out, compression="none")  # JPEG does not compress further
    return out.getvalue(), len(images), skipped


def prepare_shard(settings: PrepareSettings, plan: ShardPlan, out: Location) -> Receipt:
    """Make one shard, or keep it when its receipt matches the plan and its file the recorded checksum."""
    fingerprint = plan.fingerprint(settings)
    shard, receipt_file = out / f"{plan.stem}.parquet", out / f"{plan.stem}.json"
    if receipt_file.is_file() and shard.is_file():
        try:
            kept = Receipt(**json.loads(receipt_file.read_text()))
        except (ValueError, TypeError):
            kept = None
        if kept and kept.fingerprint == fingerprint and hashlib.sha256(shard.read_bytes()).hexdigest() == kept.sha256:
            kept.reused = True
            return kept
    data, count, skipped = encode_shard(settings, plan)
    receipt = Receipt(file=f"{plan.stem}.parquet", images=count, sha256=hashlib.sha256(data).hexdigest(),
                      fingerprint=fingerprint, skipped=skipped)
    receipt_file.unlink()  # an old receipt must not vouch for the new file while it is written
    shard.write_bytes(data)
    receipt_file.write_text(json.dumps({k: v for k, v in asdict(receipt).items() if k != "reused"}, indent=1))
    return receipt


# --------------------------------------------------------------------------- the whole set


@dataclass
class PrepareSummary:
    images: int
    shards: int
    reused: int
    skipped: list[dict[str, str]]
    manifest: Location


def prepare(settings: PrepareSettings, out: Location, classes: list[str], plans: list[ShardPlan],
            on_shard: Callable[[int, int], None] | None = None) -> PrepareSummary:
    """Make (or complete) a prepared set from its plan (:func:`plan_shards`): one Ray task per shard on
    the cluster Ray is connected to, then the manifest. ``on_shard(done, total)`` follows the progress."""
    import ray

    out.mkdir()
    for split in {p.split for p in plans}:
        (out / split).mkdir()
    task = ray.remote(prepare_shard).options(num_cpus=1, max_retries=2)
    pending = {task.remote(settings, plan, out): plan for plan in plans}
    receipts: dict[str, Receipt] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        plan = pending.pop(done[0])
        receipts[plan.stem] = ray.get(done[0])
        if on_shard:
            on_shard(len(receipts), len(plans))
    return write_manifest(settings, out, classes, plans, receipts)


def write_manifest(settings: PrepareSettings, out: Location, classes: list[str], plans: list[ShardPlan],
                   receipts: dict[str, Receipt]) -> PrepareSummary:
    """The manifest of a set whose every planned shard has its receipt (by the plan's stem)."""
    splits: dict[str, Any] = {}
    for plan in plans:
        r = receipts[plan.stem]
        split = splits.setdefault(plan.split, {"images": 0, "shards": []})
        split["images"] += r.images
        split["shards"].append({"file": r.file, "images": r.images, "sha256": r.sha256})
    skipped = [s for plan in plans for s in receipts[plan.stem].skipped]
    manifest = {"format": FORMAT, "source": settings.root, "dataset": settings.kind,
                "resolution": settings.resolution, "quality": settings.quality, "classes": classes,
                "splits": splits, "unreadable": {"count": len(skipped), "images": skipped}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return PrepareSummary(images=sum(s["images"] for s in splits.values()), shards=len(plans),
                          reused=sum(r.reused for r in receipts.values()), skipped=skipped, manifest=out / MANIFEST)


# --------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class Manifest:
    root: Location
    resolution: int
    classes: tuple[str, ...]
    splits: dict[str, list[dict[str, Any]]]  # split -> its shards (file, images, sha256)

    def images(self, split: str) -> int:
        return sum(s["images"] for s in self.splits.get(split, []))


def read_manifest(path: str | Path | Location) -> Manifest:
    """A prepared set's manifest (the file, or the directory holding it), checked; one line when unusable."""
    where = Location.of(path)
    if not where.name.endswith(".json"):
        where = where / MANIFEST
    if not where.is_file():
        raise DataError(f"prepared: no manifest at {where} (run `mae-search prepare SOURCE OUT` first)")
    try:
        data = json.loads(where.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        splits = {name: list(s["shards"]) for name, s in data["splits"].items()}
        return Manifest(where.parent, int(data["resolution"]), tuple(data["classes"]), splits)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"prepared: {where} is not a usable manifest ({exc})") from None


def read_shard(manifest: Manifest, shard: dict[str, Any]) -> tuple[list[bytes], np.ndarray]:
    """A shard's JPEG bytes and labels; a missing, truncated or altered shard is one line naming the file."""
    import pyarrow.parquet as pq

    where = manifest.root / shard["file"]
    if not where.is_file():
        raise DataError(f"prepared: shard {where} is missing (rerun `mae-search prepare` to remake it)")
    data = where.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise DataError(f"prepared: shard {where} is truncated or altered (checksum mismatch; rerun "
                        f"`mae-search prepare` to remake it)")
    table = pq.read_table(io.BytesIO(data))
    return table.column("image").to_pylist(), table.column("label").to_numpy()


def decode(jpeg: bytes, where: str) -> np.ndarray:
    """One stored image -> uint8 (3, H, W); a corrupt one is one line naming the shard and row."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"prepared: corrupt image at {where} ({type(exc).__name__})") from None
