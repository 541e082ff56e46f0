"""`mae-search prepare`: a generated JPEG ImageFolder into verified Parquet shards, resumably."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_search.data import DataError
from mae_search.prepare import (
    MANIFEST,
    PrepareSettings,
    decode,
    plan_shards,
    prepare_shard,
    read_manifest,
    read_shard,
)
from mae_search.storage import Location
from tests.conftest import cli

CLASSES = ("ants", "bees", "wasps")


def write_imagefolder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """JPEGs of varied sizes whose mean colour encodes the class (so labels can be checked after decoding);
    one corrupt file in train/ants."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(20, 48, size=2)
                pixels = np.full((h, w, 3), 40 + 80 * c, dtype=np.int16) + rng.integers(-10, 10, (h, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=95)
    (root / "train" / "ants" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_imagefolder(tmp_path / "src", {"train": 20, "val": 6})


def settings_for(folder: Path, resolution: int = 16) -> PrepareSettings:
    return PrepareSettings("imagefolder", str(folder), resolution)


def test_plan_is_fixed_and_covers_every_file(folder):
    classes, plans = plan_shards(settings_for(folder), shard_size=16)
    again = plan_shards(settings_for(folder), shard_size=16)[1]
    assert classes == list(CLASSES) and plans == again
    train = [item for p in plans if p.split == "train" for item in p.items]
    assert len(train) == 3 * 20 + 1 and len({rel for rel, _ in train}) == len(train)
    assert [p.stem for p in plans[:2]] == ["train/shard-00000", "train/shard-00001"]
    assert sum(len(p.items) for p in plans if p.split == "val") == 3 * 6
    # Another resolution is another set of inputs: every shard's fingerprint changes.
    assert plans[0].fingerprint(settings_for(folder)) != plans[0].fingerprint(settings_for(folder, 24))


def test_shard_holds_square_images_with_labels_and_names_the_unreadable(folder, tmp_path):
    settings = settings_for(folder)
    _, plans = plan_shards(settings, shard_size=100)
    out = Location.of(tmp_path / "prepared")
    receipt = prepare_shard(settings, plans[0], out)
    assert receipt.images == 3 * 20 and not receipt.reused
    assert [s["path"] for s in receipt.skipped] == [str(folder / "train" / "ants" / "broken.jpg")]
    manifest_like = type("M", (), {"root": out})()
    images, labels = read_shard(manifest_like, {"file": receipt.file, "sha256": receipt.sha256})
    decoded = np.stack([decode(jpeg, "x") for jpeg in images])
    assert decoded.shape == (60, 3, 16, 16)
    means = decoded.reshape(60, -1).mean(axis=1)
    expected = 40 + 80 * labels
    assert np.abs(means - expected).max() < 8, "an image does not carry its class's colour"
    assert sorted(np.bincount(labels)) == [20, 20, 20]
    with pytest.raises(DataError, match=r"corrupt image at shard-00000\.parquet row 3"):
        decode(b"garbage", "shard-00000.parquet row 3")


def test_rerun_keeps_verified_shards_and_remakes_a_truncated_one(folder, tmp_path):
    settings = settings_for(folder)
    _, plans = plan_shards(settings, shard_size=16)
    out = Location.of(tmp_path / "prepared")
    first = [prepare_shard(settings, p, out) for p in plans]
    truncated = tmp_path / "prepared" / first[1].file
    truncated.write_bytes(truncated.read_bytes()[:500])
    manifest_like = type("M", (), {"root": out})()
    with pytest.raises(DataError, match=f"shard {truncated} is truncated or altered"):
        read_shard(manifest_like, {"file": first[1].file, "sha256": first[1].sha256})
    second = [prepare_shard(settings, p, out) for p in plans]
    assert [r.reused for r in second] == [i != 1 for i in range(len(plans))]
    assert second[1].sha256 == first[1].sha256  # remade identically
    # A changed setting remakes them all.
    assert not any(prepare_shard(settings_for(folder, 24), p, out).reused for p in plans[:2])


def test_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="no manifest at .*run `mae-search prepare"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(DataError, match="is not a usable manifest .*format 'other/9'"):
        read_manifest(tmp_path)


def test_prepare_rejects_a_missing_source_before_ray_starts(tmp_path):
    proc = cli("prepare", str(tmp_path / "nowhere"), str(tmp_path / "out"), check=False, timeout=120)
    assert proc.returncode == 2
    assert f"error: prepare: source {tmp_path / 'nowhere'} does not exist" in proc.stdout
    assert "Ray" not in proc.stdout
    (tmp_path / "flat").mkdir()
    proc = cli("prepare", str(tmp_path / "flat"), str(tmp_path / "out"), check=False, timeout=120)
    assert proc.returncode == 2 and "is not an ImageFolder tree" in proc.stdout


@pytest.mark.slow
def test_prepare_command_runs_in_ray_tasks_and_resumes(folder, tmp_path):
    """The command a user runs: every image prepared (the corrupt one named and counted), then a rerun that
    keeps the verified shards and remakes only the damaged one, the manifest the same."""
    out = tmp_path / "prepared"
    args = ("prepare", str(folder), str(out), "--resolution", "16", "--shard-size", "16", "--num-cpus", "2")
    first = cli(*args).stdout
    assert "prepared 78 images in 7 shards (0 kept from an earlier run, 7 made)" in first, first
    assert "1 unreadable image(s) skipped" in first and str(folder / "train/ants/broken.jpg") in first
    manifest = read_manifest(out)
    assert manifest.classes == CLASSES and manifest.resolution == 16
    assert manifest.images("train") == 60 and manifest.images("val") == 18
    recorded = json.loads((out / MANIFEST).read_text())
    assert recorded["unreadable"]["count"] == 1
    shard = out / manifest.splits["train"][2]["file"]
    shard.write_bytes(shard.read_bytes()[:300])
    second = cli(*args).stdout
    assert "prepared 78 images in 7 shards (6 kept from an earlier run, 1 made)" in second, second
    assert json.loads((out / MANIFEST).read_text()) == recorded
