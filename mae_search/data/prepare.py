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

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mae_search.data import sources
from mae_search.data.memory import DataError
from mae_search.data.shards import FORMAT, MANIFEST
from mae_search.storage import Location

SourceKind = Literal["imagefolder", "stl10", "cifar10", "synthetic_shapes"]


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


def settings_for(source: str, dataset: str | None, resolution: int | None, quality: int,
                 images: int | None) -> PrepareSettings:
    """What ``mae-search prepare SOURCE`` makes, checked in one line: the embedded generated set by name,
    or a directory whose format is given (``--dataset``) or detected from its layout."""
    if source == sources.SYNTHETIC:
        kind, root = sources.SYNTHETIC, sources.SYNTHETIC
    else:
        path = Path(source).expanduser().resolve()
        if not path.is_dir():
            raise DataError(f"prepare: source {path} does not exist or is not a directory")
        if dataset not in (None, "imagefolder", "stl10", "cifar10"):
            raise DataError(f"prepare: --dataset {dataset}: expected imagefolder, stl10 or cifar10")
        if images is not None:
            raise DataError("prepare: --images applies to synthetic_shapes only")
        kind, root = dataset or sources.detect_kind(path), str(path)
    return PrepareSettings(kind, root, resolution or sources.SOURCES[kind].native_resolution, quality, images)


def plan_shards(settings: PrepareSettings, shard_size: int) -> tuple[list[str], list[ShardPlan]]:
    """Classes, and every shard of every split in a fixed order (the same plan on every rerun)."""
    root = Path(settings.root)
    plans: list[ShardPlan] = []
    if settings.kind == "imagefolder":
        classes, splits = sources.imagefolder_items(root)
        for split, items in splits.items():
            for i, start in enumerate(range(0, len(items), shard_size)):
                plans.append(ShardPlan(split, i, items=tuple(items[start:start + shard_size])))
        return classes, plans
    classes, counts = sources.SOURCES[settings.kind].catalogue(root, settings.synthetic_images)
    for split, count in counts.items():
        for i, start in enumerate(range(0, count, shard_size)):
            plans.append(ShardPlan(split, i, start=start, stop=min(count, start + shard_size)))
    return classes, plans


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

    square = sources.square_image(settings.resolution)
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
        pixels, ys = sources.SOURCES[settings.kind].read_range(
            Path(settings.root), plan.split, plan.start, plan.stop, settings.resolution, settings.synthetic_images)
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
