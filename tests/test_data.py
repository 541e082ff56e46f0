import pickle

import numpy as np
import pytest
import torch

from mae_search.config import DataConfig, ModelConfig
from mae_search.data.load import load_data
from mae_search.data.memory import DataError, crop_flip, epoch_batches, random_resized_crop_flip, synthetic_shapes
from mae_search.data.sources import load_cifar10, load_stl10


def test_synthetic_shapes_deterministic_labelled_and_balanced():
    a, b = synthetic_shapes(200, 32, seed=3), synthetic_shapes(200, 32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (200, 3, 32, 32)
    assert torch.bincount(a.labels).tolist() == [20] * 10
    assert not torch.equal(a.images, synthetic_shapes(200, 32, seed=4).images)


def test_missing_paths_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(DataError, match="missing file"):
        load_stl10(tmp_path)
    with pytest.raises(ValueError, match="data.path is required"):
        DataConfig(dataset="stl10")


def test_cifar10_reader(tmp_path):
    rng = np.random.default_rng(0)
    pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, (tmp_path / "batches.meta").open("wb"))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        pickle.dump(batch, (tmp_path / name).open("wb"))
    train, test = load_cifar10(tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes[3] == "c3"
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_cifar10(tmp_path)


class _Hostile:
    """Unpickling this runs a shell command (what a crafted data file or checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar_file_runs_nothing(tmp_path):
    test_cifar10_reader(tmp_path)  # a valid set, then one batch replaced by a hostile pickle
    marker = tmp_path / "pwned"
    pickle.dump({"data": _Hostile(marker), "labels": [0]}, (tmp_path / "test_batch").open("wb"))
    with pytest.raises(DataError, match=r"cifar10: cannot read .*test_batch .*refusing posix.system") as exc:
        load_cifar10(tmp_path)
    assert not marker.exists() and "\n" not in str(exc.value)


def test_stl10_reader_transposes_column_major(tmp_path):
    img = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    img[0, :, 0, 5] = 255  # row 0, column 5 in (C, H, W)
    stored = img.transpose(0, 1, 3, 2)  # STL-10 stores (C, W, H)
    for split in ("train", "test"):
        stored.tofile(tmp_path / f"{split}_X.bin")
        np.array([3], dtype=np.uint8).tofile(tmp_path / f"{split}_y.bin")
    unlabeled, train, _ = load_stl10(tmp_path)
    assert train.images[0, 0, 0, 5] == 255 and train.images[0, 0, 5, 0] == 0
    assert train.labels.tolist() == [2]
    assert len(unlabeled) == 1
    (tmp_path / "train_X.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_stl10(tmp_path)


def test_load_data_resizes_to_model():
    splits = load_data(DataConfig(num_train=32, num_test=16), ModelConfig(img_size=16, patch_size=4))
    assert splits.pretrain.images.shape[-1] == 16


def test_batched_augmentation_shapes_and_identity_crop():
    imgs = torch.rand(8, 3, 16, 16)
    out = random_resized_crop_flip(imgs, (0.3, 1.0), True, torch.Generator().manual_seed(0))
    assert out.shape == imgs.shape
    assert not torch.allclose(out, imgs)
    # Full-area crop with aspect 1 and no flip reproduces the image.
    same = random_resized_crop_flip(imgs, (1.0, 1.0), False, torch.Generator().manual_seed(0))
    mse = ((same - imgs) ** 2).mean()
    assert mse < ((out - imgs) ** 2).mean()


def test_crop_flip_uniforms_set_box_and_flip():
    """Uniforms (area, aspect, x, y, flip): a full, square, centred box is the identity, or the mirror image."""
    imgs = torch.rand(2, 3, 16, 16)
    centred = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.9], [0.0, 0.5, 0.5, 0.5, 0.1]])
    out = crop_flip(imgs, centred, (1.0, 1.0), hflip=True)
    torch.testing.assert_close(out[0], imgs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], imgs[1].flip(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crop_flip(imgs, centred, (1.0, 1.0), hflip=False), imgs, rtol=1e-5, atol=1e-5)
    # A quarter-area box in the top-left corner magnifies that corner.
    corner = crop_flip(imgs, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.9]] * 2), (0.25, 0.25), hflip=True)
    up = torch.nn.functional.interpolate(imgs[:, :, :8, :8], size=16, mode="bilinear", align_corners=False)
    assert ((corner - up) ** 2).mean() < 0.1 * ((corner - imgs) ** 2).mean()


def test_epoch_batches_shard_disjointly():
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    r0 = torch.cat(epoch_batches(100, 10, g0, rank=0, world_size=2))
    r1 = torch.cat(epoch_batches(100, 10, g1, rank=1, world_size=2))
    assert len(r0) == len(r1) == 50 and not set(r0.tolist()) & set(r1.tolist())
    with pytest.raises(DataError, match="smaller than one batch"):
        epoch_batches(5, 10, torch.Generator())


def test_imagefolder_reader(tmp_path):
    from PIL import Image

    from mae_search.data.sources import load_imagefolder

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    train, val = load_imagefolder(tmp_path, 16)
    assert train.images.shape == (6, 3, 16, 16) and train.images.dtype == torch.uint8
    assert train.classes == ("cat", "dog") and sorted(val.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="must contain train/ and val/"):
        load_imagefolder(tmp_path / "train", 16)


def test_every_rank_takes_the_same_number_of_steps():
    """256 images on 2 ranks in batches of 64: strided shards of 128 and 128, never 129 and 127."""
    for n in (255, 256, 257):
        counts = {len(epoch_batches(n, 64, torch.Generator().manual_seed(1), rank=r, world_size=2)) for r in (0, 1)}
        assert len(counts) == 1, n
    sizes = [sum(len(b) for b in epoch_batches(129, 1, torch.Generator().manual_seed(0), r, 2)) for r in (0, 1)]
    assert sizes == [64, 64]


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in images}


def test_validation_split_is_carved_from_the_labelled_images_per_seed():
    cfg = DataConfig(num_train=400, num_test=100, num_labelled=200, val_split=0.25)
    model = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    first = load_data(cfg, model, seed=0)
    labelled = load_data(cfg.model_copy(update={"val_split": 1}), model, seed=0)  # 199 + 1: nearly all
    assert (len(first.train), len(first.val), len(first.test)) == (150, 50, 100)
    train, val = _rows(first.train.images), _rows(first.val.images)
    assert not train & val and not val & _rows(first.test.images)
    assert train | val == _rows(labelled.train.images) | _rows(labelled.val.images)  # the same 200 images
    again, other = load_data(cfg, model, seed=0), load_data(cfg, model, seed=1)
    assert torch.equal(again.val.images, first.val.images)  # the same seed, the same split
    assert _rows(other.val.images) != val and len(other.val) == 50  # another seed, another draw
    assert len(load_data(cfg.model_copy(update={"val_split": 30}), model, seed=0).val) == 30  # a count


def test_prepared_validation_takes_whole_train_shards():
    from mae_search.data.shards import Manifest
    from mae_search.data.stream import VAL_SPLIT, validation_shards
    from mae_search.storage import Location

    shards = [{"file": f"train-{i}.parquet", "images": n} for i, n in enumerate((100, 100, 60))]
    manifest = Manifest(Location.of("/data/prepared"), 32, ("a", "b"), {"train": shards, "val": []})
    carved = validation_shards(manifest, 150)
    assert carved.splits[VAL_SPLIT] == shards[:2] and carved.splits["train"] == shards[2:]
    assert validation_shards(manifest, 80).splits["train"] == shards[1:]
    with pytest.raises(DataError, match="the validation split \\(260 images\\) needs whole shards"):
        validation_shards(manifest, 260)


def _ramp(b: int = 8, size: int = 32) -> torch.Tensor:
    """uint8 images whose red channel is the x coordinate (0 at the left, 255 at the right)."""
    x = torch.linspace(0, 255, size).round().to(torch.uint8)
    imgs = torch.zeros(b, 3, size, size, dtype=torch.uint8)
    imgs[:, 0] = x.view(1, 1, size)
    return imgs


def test_augmentations_crop_as_the_paper_names_them():
    """none leaves the view; crop_fixed always spans sqrt(FIXED_CROP_AREA) of the width; crop_rand's span
    varies with its scale; crop_rand is today's random resized crop exactly."""
    from mae_search.data.memory import FIXED_CROP_AREA, augment, crop_flip, denormalize, draw_crop_flip, normalize

    imgs = _ramp()
    uniforms = draw_crop_flip(len(imgs), torch.Generator().manual_seed(0))

    def spans(kind: str) -> torch.Tensor:
        red = denormalize(augment(imgs, uniforms, kind, (0.2, 1.0), hflip=False))[:, 0, 16]
        return red.amax(dim=1) - red.amin(dim=1)

    assert torch.equal(augment(imgs, uniforms, "none", (0.2, 1.0), True), normalize(imgs))
    fixed = spans("crop_fixed")
    assert torch.allclose(fixed, torch.full_like(fixed, FIXED_CROP_AREA**0.5), atol=0.04), fixed
    assert spans("crop_rand").std() > 0.1
    assert torch.equal(augment(imgs, uniforms, "crop_rand", (0.2, 1.0), True),
                       crop_flip(normalize(imgs), uniforms, (0.2, 1.0), True))


def test_colour_jitter_matches_torchvision_and_is_seeded():
    import torchvision.transforms.functional as TF

    from mae_search.data.memory import augment, colour_jitter

    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    factors = torch.tensor([[0.7, 1.3, 0.6], [1.4, 0.8, 1.2], [1.0, 1.0, 1.0], [1.1, 0.6, 1.4]])
    ours = colour_jitter(images, factors)
    for i, (b, c, s) in enumerate(factors.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(images[i], b), c), s)
        assert torch.allclose(ours[i], ref, atol=1e-5)
    imgs, uniforms = _ramp(), torch.rand(8, 5)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(augment(imgs, uniforms, "crop_color", (0.2, 1.0), True))
    assert torch.equal(*draws) and not torch.equal(draws[0], augment(imgs, uniforms, "crop_rand", (0.2, 1.0), True))
