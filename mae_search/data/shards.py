"""A prepared set on disk, read back: its manifest, its shards, and their images.

``mae-search prepare`` (:mod:`mae_search.data.prepare`) writes::

    OUT/manifest.json                  format, resolution, classes, and per split its shards
    OUT/<split>/shard-00000.parquet    columns: image (JPEG), label (int64; -1 unlabelled), key

Everything here checks what it reads (format, checksums, decodability) and names the
file in one line when it is unusable, so a damaged set fails a trial at once with its cause.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae_search.data.memory import DataError
from mae_search.storage import Location

FORMAT = "mae-search-prepared/1"
MANIFEST = "manifest.json"


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
