"""`mae-search prepare`: a generated JPEG ImageFolder into verified Parquet shards, resumably."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_search.data.memory import DataError
from mae_search.data.prepare import PrepareSettings, plan_shards, prepare_shard
from mae_search.data.shards import MANIFEST, decode, read_manifest, read_shard
from mae_search.search.results import read_results
from mae_search.storage import Location
from tests.conftest import cli, micro_space

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


def test_synthetic_shapes_prepare_as_the_embedded_set_and_images_is_theirs_alone(tmp_path, folder):
    from mae_search.data.memory import SHAPE_CLASSES, synthetic_shapes
    from mae_search.data.prepare import write_manifest
    from mae_search.data.stream import load_labelled

    settings = PrepareSettings("synthetic_shapes", "synthetic_shapes", 32, synthetic_images=64)
    classes, plans = plan_shards(settings, shard_size=24)
    assert classes == list(SHAPE_CLASSES)
    assert [(p.split, p.stop - p.start) for p in plans] == [("train", 24), ("train", 24), ("train", 16), ("test", 16)]
    target = Location.of(tmp_path / "shapes")
    write_manifest(settings, target, classes, plans, {p.stem: prepare_shard(settings, p, target) for p in plans})
    manifest = read_manifest(tmp_path / "shapes")
    # Shard by shard, the same images as the in-memory set of seed 0 (up to JPEG), with their labels.
    for split, seed in (("train", 10_000), ("test", 20_000)):
        stored, expected = load_labelled(manifest, split, 1000), synthetic_shapes(64 if split == "train" else 16,
                                                                                   32, seed=seed)
        assert torch.equal(stored.labels, expected.labels)
        # JPEG drops the pixel noise (std 7.6 grey levels), not the shapes: 4 x 4 averages agree closely.
        pooled = [torch.nn.functional.avg_pool2d(x.images.float(), 4) for x in (stored, expected)]
        assert (pooled[0] - pooled[1]).abs().mean() < 3.0
    proc = cli("prepare", str(folder), str(tmp_path / "out"), "--images", "100", check=False, timeout=120)
    assert proc.returncode == 2 and "--images applies to synthetic_shapes only" in proc.stdout


@pytest.mark.slow
def test_prepare_command_runs_in_ray_tasks_and_resumes(folder, tmp_path):
    """The command a user runs: every image prepared (the corrupt one named and counted), then a rerun that
    keeps the verified shards and remakes only the damaged one, the manifest the same."""
    out = tmp_path / "prepared"
    args = ("prepare", str(folder), str(out), "--resolution", "16", "--shard-size", "16", "--num-cpus", "2")
    first = cli(*args).stdout
    assert "prepared 78 images in 6 shards (0 kept from an earlier run, 6 made)" in first, first
    assert "1 unreadable image(s) skipped" in first and str(folder / "train/ants/broken.jpg") in first
    manifest = read_manifest(out)
    assert manifest.classes == CLASSES and manifest.resolution == 16
    assert manifest.images("train") == 60 and manifest.images("val") == 18
    recorded = json.loads((out / MANIFEST).read_text())
    assert recorded["unreadable"]["count"] == 1
    shard = out / manifest.splits["train"][2]["file"]
    shard.write_bytes(shard.read_bytes()[:300])
    second = cli(*args).stdout
    assert "prepared 78 images in 6 shards (5 kept from an earlier run, 1 made)" in second, second
    assert json.loads((out / MANIFEST).read_text()) == recorded

    # A 2-trial search trains and evaluates on it, streaming through decode workers inside the Ray tasks.
    space = micro_space(tmp_path, "streamed", "dimensions:\n  masking.mask_ratio: {grid: [0.6, 0.75]}\n"
                                              "metric: val_linear_probe_acc\nmode: max\nscheduler: {type: none}\n",
                        epochs=2)
    cli("search", str(space), "--storage", str(tmp_path / "results"), "--num-cpus", "2", "--no-mlflow",
        "--set", "data.dataset=prepared", "--set", f"data.path={out / MANIFEST}", "--set", "data.decode_workers=1",
        "--set", "batch_size=8")
    df = read_results(tmp_path / "results" / "streamed")
    assert sorted(df.groupby("trial_id")["epoch"].apply(tuple)) == [(1, 2), (1, 2)]
    assert (df["status"] == "completed").all() and df[df["epoch"] == 2]["linear_probe_acc"].between(0, 1).all()
    config = json.loads(df["config_json"].iloc[0])["data"]
    assert config["dataset"] == "prepared" and config["path"] == str(out / MANIFEST)


# --------------------------------------------------------------------------- streaming it back


def prepared_set(folder: Path, out: Path, resolution: int = 16, shard_size: int = 8) -> Path:
    """A prepared set made shard by shard in this process (the command does the same in Ray tasks)."""
    from mae_search.data.prepare import write_manifest

    settings = settings_for(folder, resolution)
    classes, plans = plan_shards(settings, shard_size)
    target = Location.of(out)
    receipts = {p.stem: prepare_shard(settings, p, target) for p in plans}
    write_manifest(settings, target, classes, plans, receipts)
    return out


def batches_of(manifest, steps, seed=0, epoch=0, rank=0, world_size=1, workers=0, batch_size=4):
    from mae_search.data.stream import PreparedSet

    stream = PreparedSet(manifest, "train", decode_workers=workers, shuffle_shards=2)
    return [b.clone() for b, _ in stream.batches(batch_size, steps, seed, epoch, rank, world_size)]


def fingerprints(batches) -> list[bytes]:
    return [image.numpy().tobytes() for batch in batches for image in batch]


def test_stream_yields_the_epochs_steps_reproducibly_from_disjoint_shards(folder, tmp_path):
    manifest = read_manifest(prepared_set(folder, tmp_path / "prepared"))
    one = batches_of(manifest, steps=5)
    assert len(one) == 5 and all(b.shape == (4, 3, 16, 16) and b.dtype == torch.uint8 for b in one)
    assert fingerprints(one) == fingerprints(batches_of(manifest, steps=5)), "same (seed, epoch), other batches"
    assert fingerprints(one) != fingerprints(batches_of(manifest, steps=5, epoch=1)), "reshuffled each epoch"
    # Decode workers change who decodes, not how many batches an epoch has.
    assert len(batches_of(manifest, steps=5, workers=2)) == 5
    # Two ranks read disjoint shards (8 shards of up to 8 images: 3 steps of 4 each stay within a rank's own).
    rank0 = set(fingerprints(batches_of(manifest, steps=3, rank=0, world_size=2)))
    rank1 = set(fingerprints(batches_of(manifest, steps=3, rank=1, world_size=2)))
    assert rank0 and rank1 and not rank0 & rank1
    # More steps than a rank's shards hold: it cycles them, so every rank takes the same number of steps.
    assert len(batches_of(manifest, steps=40, rank=1, world_size=2)) == 40


def test_a_truncated_shard_stops_training_with_one_line_naming_it(folder, tmp_path):
    out = prepared_set(folder, tmp_path / "prepared")
    manifest = read_manifest(out)
    shard = out / manifest.splits["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(DataError, match=f"shard {shard} is truncated or altered"):
        batches_of(manifest, steps=20)


def test_trainer_pretrains_and_evaluates_on_a_prepared_set(folder, tmp_path, micro_cfg):
    from mae_search.data.load import check_local_data
    from mae_search.training.train import Trainer

    out = prepared_set(folder, tmp_path / "prepared")
    cfg = micro_cfg.with_overrides({"data": {"dataset": "prepared", "path": str(out / MANIFEST),
                                             "decode_workers": 1, "eval_images": 16}, "batch_size": 8, "epochs": 2})
    check_local_data(cfg.data)
    trainer = Trainer(cfg, device=torch.device("cpu"))
    assert len(trainer.data.train) == 16 and len(trainer.data.test) == 16  # labelled subsets in memory
    # The validation split: the train split's first whole shards holding 20% of its 60 images (2 x 8).
    assert len(trainer.data.val) == 16 and trainer.data.full_train is not None and len(trainer.data.full_train) == 44
    first, last = trainer.fit()
    assert trainer.steps_per_epoch == 60 // 8 and np.isfinite(last["loss"])
    assert 0.0 <= last["linear_probe_acc"] <= 1.0 and "knn_acc" in last and "finetune_acc" in last
    # Epoch 1 is evaluated on the in-memory subset and scored on validation only; the last epoch on every
    # labelled image outside the validation shards, streamed, and scored on validation and test.
    assert (first["eval_train_images"], first["eval_val_images"], "eval_test_images" in first) == (16, 16, False)
    assert (last["eval_train_images"], last["eval_val_images"], last["eval_test_images"]) == (44, 16, 18)
    subset = Trainer(cfg.with_overrides({"data.final_eval": "subset", "epochs": 1}), device=torch.device("cpu"))
    assert subset.evaluate(final=True)["eval_test_images"] == 16
    bad = cfg.data.model_copy(update={"path": str(tmp_path / "nothing")})
    with pytest.raises(DataError, match="no manifest at"):
        check_local_data(bad)
    small = micro_cfg.with_overrides({"data": {"dataset": "prepared", "path": str(out)}, "model": {"img_size": 32,
                                      "patch_size": 8}})
    with pytest.raises(DataError, match="holds 16 px images but model.img_size is 32"):
        Trainer(small, device=torch.device("cpu"))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_evaluation_sees_what_the_in_memory_one_does(folder, tmp_path, micro_cfg, workers):
    """Features, a classifier's accuracy and DDP parts of a streamed split equal those of the same images
    decoded into memory: the last epoch's full evaluation measures what the subset one does, on more images."""
    from torch import nn

    from mae_search.data.stream import PreparedSet, load_labelled
    from mae_search.mae.model import MaskedAutoencoderViT
    from mae_search.training.evaluate import extract_features
    from mae_search.training.finetune import classifier_accuracy

    manifest = read_manifest(prepared_set(folder, tmp_path / "prepared"))
    streamed = PreparedSet(manifest, "train", decode_workers=workers, shuffle_shards=2)
    in_memory = load_labelled(manifest, "train", limit=10_000)
    model = MaskedAutoencoderViT(micro_cfg.model.model_copy(update={"img_size": 16}))
    (fs, ys), (fm, ym) = (extract_features(model, d, "cls", torch.device("cpu"), 4) for d in (streamed, in_memory))
    order_s, order_m = (torch.argsort(f[:, 0] * 1e3 + y) for f, y in ((fs, ys), (fm, ym)))
    assert len(fs) == len(in_memory) == 60 and torch.equal(ys[order_s], ym[order_m])
    torch.testing.assert_close(fs[order_s], fm[order_m])

    class MeanColour(nn.Module):  # the generated classes differ by brightness: 3 bins of the mean
        def forward(self, x):
            return nn.functional.one_hot(((x.mean((1, 2, 3)) + 2.1) / 1.4).long().clamp(0, 2), 3).float()

    accuracies = [classifier_accuracy(MeanColour(), d, torch.device("cpu"), batch_size=7)
                  for d in (streamed, in_memory)]
    assert accuracies[0] == accuracies[1] > 0.5
    parts = [[y for _, ys_ in streamed.in_order(8, rank, 2) for y in ys_.tolist()] for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(in_memory.labels.tolist()) and parts[0] and parts[1]


def test_prepared_images_are_the_in_memory_paths_up_to_jpeg(folder, tmp_path):
    """Both paths size an ImageFolder image the same way (one transform), so they differ by JPEG only."""
    from mae_search.data.sources import load_imagefolder

    (folder / "train" / "ants" / "broken.jpg").unlink()  # the in-memory loader cannot skip it
    in_memory, _ = load_imagefolder(folder, 16)
    manifest = read_manifest(prepared_set(folder, tmp_path / "prepared", shard_size=100))
    jpegs, labels = read_shard(manifest, manifest.splits["train"][0])
    streamed = np.stack([decode(jpeg, "x") for jpeg in jpegs]).astype(np.float32)
    assert streamed.shape == tuple(in_memory.images.shape) and (labels == in_memory.labels.numpy()).all()
    assert np.abs(streamed - in_memory.images.numpy()).mean() < 3.0
