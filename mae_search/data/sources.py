"""One reader per data format: how it is detected, checked, read into memory and read for ``prepare``.

A format is a :class:`Source` in :data:`SOURCES`, keyed by ``data.dataset``:

- ``detect(root)``: whether a directory holds this format (``mae-search prepare`` without ``--dataset``);
- ``check(cfg)``: before a local search starts Ray, that the data is there and readable, so a typo or a
  damaged file fails in seconds with one line naming it, not in every trial;
- ``load(cfg, size, seed)``: the splits a trial trains and evaluates on (:class:`DataSplits`);
- ``catalogue(root, images)`` and ``read_range(...)``: the classes, image counts per split, and an index
  range of one split as uint8 (n, H, W, 3) arrays, which ``prepare`` encodes into shards. ImageFolder
  lists files instead (:func:`imagefolder_items`).

Adding a format is a new Source here and its name in ``DataConfig.dataset``.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mae_search.config import DataConfig
from mae_search.data.memory import SHAPE_CLASSES, DataError, ImageSet, synthetic_shapes
from mae_search.data.stream import DataSplits, load_prepared

SYNTHETIC = "synthetic_shapes"  # the SOURCE that names the embedded generated set instead of a directory
SYNTHETIC_SEEDS = {"train": 10_000, "test": 20_000}  # the in-memory set's for seed 0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
STL_BYTES = 3 * 96 * 96  # one STL-10 image


def require_dir(path: str | Path | None, what: str) -> Path:
    p = Path(path or "").expanduser()
    if not path or not p.is_dir():
        raise DataError(f"{what}: data path {p} does not exist or is not a directory")
    return p


def resize(images: ImageSet, size: int) -> ImageSet:
    if images.images.shape[-1] == size:
        return images
    x = F.interpolate(images.images.float(), size=(size, size), mode="bilinear", antialias=True)
    return ImageSet(x.round().clamp(0, 255).to(torch.uint8), images.labels, images.classes)


def square_image(size: int):
    """Shorter side resized to ``size``, then the centre square: how an ImageFolder's images are sized, in
    memory and when prepared, so both paths see the same pictures."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])


class Source:
    """A data format. The base says what a format without that ability answers."""

    name: str = ""
    native_resolution: int = 32

    def detect(self, root: Path) -> bool:
        return False

    def check(self, cfg: DataConfig) -> None:
        raise NotImplementedError

    def load(self, cfg: DataConfig, size: int, seed: int) -> DataSplits:
        raise NotImplementedError

    def catalogue(self, root: Path, images: int | None) -> tuple[list[str], dict[str, int]]:
        raise DataError(f"prepare: {self.name} cannot be prepared")

    def read_range(self, root: Path, split: str, start: int, stop: int, resolution: int,
                   images: int | None) -> tuple[np.ndarray, np.ndarray]:
        raise DataError(f"prepare: {self.name} cannot be prepared")


# --------------------------------------------------------------------------- the embedded generated set


class SyntheticShapes(Source):
    name, native_resolution = SYNTHETIC, 32

    def check(self, cfg: DataConfig) -> None:
        return  # generated: nothing to check

    def load(self, cfg: DataConfig, size: int, seed: int) -> DataSplits:
        train = synthetic_shapes(cfg.num_train, size, seed=SYNTHETIC_SEEDS["train"] + seed)
        test = synthetic_shapes(cfg.num_test, size, seed=SYNTHETIC_SEEDS["test"] + seed)
        return DataSplits(train, train, test)

    def catalogue(self, root: Path, images: int | None) -> tuple[list[str], dict[str, int]]:
        train = images or 8000
        return list(SHAPE_CLASSES), {"train": train, "test": max(16, train // 8)}

    def read_range(self, root: Path, split: str, start: int, stop: int, resolution: int,
                   images: int | None) -> tuple[np.ndarray, np.ndarray]:
        pixels, labels = _synthetic_split(split, self.catalogue(root, images)[1][split], resolution)
        return pixels[start:stop], labels[start:stop]


@functools.cache
def _synthetic_split(split: str, count: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole generated split (its images depend on its size, so a shard cannot be generated alone);
    cached, as a task process makes several shards of it."""
    data = synthetic_shapes(count, resolution, seed=SYNTHETIC_SEEDS[split])
    return data.images.permute(0, 2, 3, 1).contiguous().numpy(), data.labels.numpy()


# --------------------------------------------------------------------------- CIFAR-10


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-10 batches hold (dicts, lists, strings, numbers, numpy arrays):
    a crafted data file cannot make the loader import or call anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"cifar10: missing file {path}")
    try:
        with path.open("rb") as f:
            data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad (or hostile) file
        raise DataError(f"cifar10: cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"cifar10: {path} is not a CIFAR-10 batch (a dict was expected)")
    return data


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3072, int64 labels N) of one CIFAR-10 batch, or one line naming what is wrong."""
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"cifar10: {path} has no N x 3072 uint8 'data' array (found {shape})")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise DataError(f"cifar10: {path} has {len(labels) if labels is not None else 'no'} labels for "
                        f"{len(data)} images")
    return data, np.asarray(labels, dtype=np.int64)


def cifar_root(root: Path) -> Path:
    return root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root


CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_PER_BATCH = 10_000


def load_cifar10(root: str | Path) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 'python version' (cifar-10-batches-py/data_batch_1..5, test_batch)."""
    root = cifar_root(require_dir(root, "cifar10"))
    classes = tuple(_unpickle(root / "batches.meta")["label_names"])

    def read(names: list[str]) -> ImageSet:
        batches = [_cifar_batch(root / n) for n in names]
        data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([b[1] for b in batches])
        return ImageSet(torch.from_numpy(data), torch.from_numpy(labels), classes)

    return read(CIFAR_BATCHES["train"]), read(CIFAR_BATCHES["test"])


class Cifar10(Source):
    name, native_resolution = "cifar10", 32

    def detect(self, root: Path) -> bool:
        return (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").is_file()

    def check(self, cfg: DataConfig) -> None:
        # About a second: every batch unpickled (arrays only) and its shape checked.
        load_cifar10(require_dir(cfg.path, "data.path (cifar10)"))

    def load(self, cfg: DataConfig, size: int, seed: int) -> DataSplits:
        train, test = (resize(s, size) for s in load_cifar10(cfg.path))
        return DataSplits(train, train, test)

    def catalogue(self, root: Path, images: int | None) -> tuple[list[str], dict[str, int]]:
        labels = list(_unpickle(cifar_root(root) / "batches.meta")["label_names"])
        return labels, {split: len(names) * CIFAR_PER_BATCH for split, names in CIFAR_BATCHES.items()}

    def read_range(self, root: Path, split: str, start: int, stop: int, resolution: int,
                   images: int | None) -> tuple[np.ndarray, np.ndarray]:
        parts, labels = [], []
        for b, name in enumerate(CIFAR_BATCHES[split]):
            offset = b * CIFAR_PER_BATCH
            lo, hi = max(start, offset), min(stop, offset + CIFAR_PER_BATCH)
            if lo < hi:  # only the batches the range touches are read
                data, y = _cifar_batch(cifar_root(root) / name)
                parts.append(data.reshape(-1, 3, 32, 32)[lo - offset:hi - offset].transpose(0, 2, 3, 1))
                labels.append(y[lo - offset:hi - offset])
        return np.ascontiguousarray(np.concatenate(parts)), np.concatenate(labels)


# --------------------------------------------------------------------------- STL-10


def stl_root(root: Path) -> Path:
    return root / "stl10_binary" if (root / "stl10_binary").is_dir() else root


STL_FILES = {"train": "train_X.bin", "test": "test_X.bin", "unlabeled": "unlabeled_X.bin"}


def stl_count(path: Path) -> int:
    """Images in an STL-10 image file, or one line saying it is missing or truncated."""
    if not path.is_file():
        raise DataError(f"stl10: missing file {path}")
    if path.stat().st_size % STL_BYTES:
        raise DataError(f"stl10: {path} is truncated or not an STL-10 image file")
    return path.stat().st_size // STL_BYTES


def _read_stl_images(path: Path) -> torch.Tensor:
    stl_count(path)
    raw = np.fromfile(path, dtype=np.uint8)
    # STL-10 stores column-major (N, C, W, H); transpose to (N, C, H, W).
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


def _read_stl_labels(path: Path, count: int) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"stl10: missing file {path}")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # file labels are 1..10
    if labels.size != count:
        raise DataError(f"stl10: {path} has {labels.size} labels for {count} images")
    return torch.from_numpy(labels)


def stl_classes(root: Path) -> list[str]:
    names = root / "class_names.txt"
    return names.read_text().split() if names.is_file() else [str(i) for i in range(10)]


def load_stl10(root: str | Path) -> tuple[ImageSet, ImageSet, ImageSet]:
    """STL-10 binary release (stl10_binary/): unlabeled, train and test splits."""
    root = stl_root(require_dir(root, "stl10"))
    classes = tuple(stl_classes(root))
    splits = []
    for split in ("train", "test"):
        imgs = _read_stl_images(root / STL_FILES[split])
        splits.append(ImageSet(imgs, _read_stl_labels(root / f"{split}_y.bin", len(imgs)), classes))
    unlabeled_file = root / STL_FILES["unlabeled"]
    if unlabeled_file.is_file():
        imgs = _read_stl_images(unlabeled_file)
        unlabeled = ImageSet(imgs, torch.full((len(imgs),), -1, dtype=torch.int64), classes)
    else:
        unlabeled = splits[0]
    return unlabeled, splits[0], splits[1]


class Stl10(Source):
    name, native_resolution = "stl10", 96

    def detect(self, root: Path) -> bool:
        return (root / "stl10_binary").is_dir() or (root / "train_X.bin").is_file()

    def check(self, cfg: DataConfig) -> None:
        stl = stl_root(require_dir(cfg.path, "data.path (stl10)"))
        for split in ("train", "test"):
            count = stl_count(stl / STL_FILES[split])
            labels = stl / f"{split}_y.bin"
            if not labels.is_file() or labels.stat().st_size != count:
                raise DataError(f"stl10: {labels} is missing or does not hold {count} labels")

    def load(self, cfg: DataConfig, size: int, seed: int) -> DataSplits:
        unlabeled, train, test = (resize(s, size) for s in load_stl10(cfg.path))
        return DataSplits(unlabeled, train, test)

    def catalogue(self, root: Path, images: int | None) -> tuple[list[str], dict[str, int]]:
        stl = stl_root(root)
        counts = {split: stl_count(stl / file) for split, file in STL_FILES.items()
                  if split == "train" or (stl / file).is_file()}
        return stl_classes(stl), counts

    def read_range(self, root: Path, split: str, start: int, stop: int, resolution: int,
                   images: int | None) -> tuple[np.ndarray, np.ndarray]:
        stl = stl_root(root)
        file = STL_FILES[split]
        pixels = np.memmap(stl / file, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)[start:stop]
        pixels = np.ascontiguousarray(pixels.transpose(0, 3, 2, 1))  # stored column-major (C, W, H)
        if split == "unlabeled":
            return pixels, np.full(len(pixels), -1, dtype=np.int64)
        labels = np.fromfile(stl / file.replace("_X", "_y"), dtype=np.uint8).astype(np.int64) - 1
        return pixels, labels[start:stop]


# --------------------------------------------------------------------------- ImageFolder


def imagefolder_test_dir(root: Path) -> Path:
    """train/ and val/ (or test/): the layout every ImageFolder reader needs, or one line saying so."""
    test = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test is None:
        raise DataError(f"imagefolder: {root} must contain train/ and val/ (or test/) class folders")
    return test


def load_imagefolder(root: str | Path, size: int) -> tuple[ImageSet, ImageSet]:
    """An ImageFolder tree with train/ and val/ (or test/) sub-trees, resized to ``size``.

    Images are decoded once into memory, so this suits data sets up to a few
    hundred thousand small images (STL-10/ImageNet-100 scale at low resolution).
    """
    from torchvision import datasets, transforms

    root = require_dir(root, "imagefolder")
    test_dir = imagefolder_test_dir(root)
    tf = transforms.Compose([square_image(size), transforms.PILToTensor()])

    def read(path: Path) -> ImageSet:
        ds = datasets.ImageFolder(str(path), transform=tf)
        if len(ds) == 0:
            raise DataError(f"imagefolder: no images under {path}")
        imgs = torch.stack([ds[i][0] for i in range(len(ds))])
        return ImageSet(imgs, torch.tensor(ds.targets, dtype=torch.int64), tuple(ds.classes))

    return read(root / "train"), read(test_dir)


def imagefolder_items(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
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


class ImageFolder(Source):
    name, native_resolution = "imagefolder", 224

    def detect(self, root: Path) -> bool:
        return (root / "train").is_dir()

    def check(self, cfg: DataConfig) -> None:
        imagefolder_test_dir(require_dir(cfg.path, "data.path (imagefolder)"))

    def load(self, cfg: DataConfig, size: int, seed: int) -> DataSplits:
        train, test = load_imagefolder(cfg.path, size)
        return DataSplits(train, train, test)


# --------------------------------------------------------------------------- a prepared set


class Prepared(Source):
    """A set made by ``mae-search prepare``: streamed for pre-training (see :mod:`mae_search.data.stream`)."""

    name = "prepared"

    def check(self, cfg: DataConfig) -> None:
        from mae_search.data.shards import read_manifest

        read_manifest(cfg.path)

    def load(self, cfg: DataConfig, size: int, seed: int) -> DataSplits:
        return load_prepared(cfg.path, size, cfg.eval_images, cfg.decode_workers, cfg.shuffle_shards,
                             cfg.val_count)


SOURCES: dict[str, Source] = {s.name: s for s in (SyntheticShapes(), Cifar10(), Stl10(), ImageFolder(), Prepared())}


def detect_kind(root: Path) -> str:
    """The source's format from its layout (STL-10 binary, CIFAR-10 python batches, or class folders)."""
    for name in ("stl10", "cifar10", "imagefolder"):
        if SOURCES[name].detect(root):
            return name
    raise DataError(f"prepare: {root} is not an ImageFolder tree (train/, val/), STL-10 or CIFAR-10 directory")
