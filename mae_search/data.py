"""Image data: the embedded synthetic set, readers for real data, and on-device augmentation.

Small data sets are held as one uint8 tensor (N, C, H, W) with integer labels,
moved to the training device once, and augmented there a whole batch at a time
(random resized crop through one ``grid_sample`` call, random flip). That keeps
Python out of the per-sample path, which on small images is what makes a
classic per-sample DataLoader the bottleneck.
"""

from __future__ import annotations

import functools
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mae_search.config import DataConfig, ModelConfig

if TYPE_CHECKING:
    from mae_search.stream import PreparedSet

SHAPE_CLASSES = (
    "disk", "square", "ring", "triangle", "plus", "stripes", "diamond", "x-cross", "two-dots", "frame",
)


class DataError(ValueError):
    """A data set that cannot be read, worded as one line naming the path."""


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) with int64 labels (-1 where a split has none)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)


@dataclass
class DataSplits:
    """``pretrain`` feeds MAE (in memory, or streamed from a prepared set); ``train``/``test`` are the
    labelled splits for probing, k-NN and fine-tuning, in memory. A prepared set also gives its whole
    labelled splits, streamed (``full_train``/``full_test``), for the last epoch's evaluation."""

    pretrain: ImageSet | PreparedSet
    train: ImageSet
    test: ImageSet
    full_train: PreparedSet | None = None
    full_test: PreparedSet | None = None

    def labelled(self, final: bool) -> tuple[ImageSet | PreparedSet, ImageSet | PreparedSet]:
        """The (train, test) an evaluation uses: the whole splits at the last epoch where there are
        streamed ones, else the in-memory ones."""
        train, test = self.train, self.test
        if final:
            train = self.full_train if self.full_train is not None else train
            test = self.full_test if self.full_test is not None else test
        return train, test


# --------------------------------------------------------------------------- synthetic


def _shape_masks(kind: np.ndarray, cx, cy, r, angle, size: int) -> np.ndarray:
    """Boolean foreground masks (B, size, size) for one class index per image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    r = r[:, None, None]
    dist = np.sqrt(dx**2 + dy**2)
    thick = np.maximum(1.5, r * 0.28)
    masks = {
        0: dist <= r,
        1: (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8),
        2: (dist <= r) & (dist >= r * 0.55),
        3: (v <= r * 0.6) & (v >= -r * 0.9 + 1.8 * np.abs(u)),
        4: ((np.abs(u) <= thick * 0.6) & (np.abs(v) <= r)) | ((np.abs(v) <= thick * 0.6) & (np.abs(u) <= r)),
        5: (np.abs(u) <= r) & (np.abs(v) <= r) & (np.mod(v + r, r * 0.5) < r * 0.25),
        6: np.abs(u) + np.abs(v) <= r,
        7: ((np.abs(u - v) <= thick * 0.8) | (np.abs(u + v) <= thick * 0.8)) & (np.abs(u) <= r * 0.75),
        8: (np.sqrt((u - r * 0.55) ** 2 + v**2) <= r * 0.4) | (np.sqrt((u + r * 0.55) ** 2 + v**2) <= r * 0.4),
        9: (np.maximum(np.abs(u), np.abs(v)) <= r * 0.85) & (np.maximum(np.abs(u), np.abs(v)) >= r * 0.5),
    }
    out = np.zeros((len(kind), size, size), dtype=bool)
    for k, m in masks.items():
        sel = kind == k
        out[sel] = m[sel]
    return out


def synthetic_shapes(n: int, size: int = 32, seed: int = 0) -> ImageSet:
    """A labelled 10-class shapes set, generated deterministically from ``seed``.

    Class = shape; colour, position, size, a small rotation and pixel noise are
    nuisances, so the label is only recoverable from shape -- what a useful
    representation must capture, and what neither raw pixels (colour and
    position vary) nor a random encoder gives. Shapes are large (radius 28-42 %
    of the image) on a flat background, so a tiny MAE learns them in about a
    minute of CPU: the trained rows beat both reference rows (see
    ``reports/``). Needs no download.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPE_CLASSES)
    rng.shuffle(labels)
    r = rng.uniform(0.28, 0.42, n).astype(np.float32) * size
    cx = rng.uniform(r, size - r).astype(np.float32)
    cy = rng.uniform(r, size - r).astype(np.float32)
    # Small tilts only: a square turned 45 degrees would be a diamond, a plus an x-cross.
    angle = rng.uniform(-np.pi / 10, np.pi / 10, n).astype(np.float32)
    fg_mask = _shape_masks(labels, cx, cy, r, angle, size)
    fg = rng.uniform(0.0, 1.0, (n, 3, 1, 1)).astype(np.float32)
    bg = rng.uniform(0.0, 1.0, (n, 3, 1, 1)).astype(np.float32)
    # Keep the shape visible: a foreground too close to the background becomes its complement.
    fg = np.where(np.abs(fg - bg).sum(axis=1, keepdims=True) < 0.6, 1.0 - bg, fg)
    img = np.where(fg_mask[:, None], fg, bg) + rng.normal(0, 0.03, (n, 3, size, size)).astype(np.float32)
    images = torch.from_numpy((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), SHAPE_CLASSES)


# --------------------------------------------------------------------------- real data


def check_local_data(cfg: DataConfig) -> None:
    """Before a local search starts Ray: the data set is there and readable, so a typo or a damaged file
    fails in seconds with one line naming it, not in every trial after Ray started."""
    if cfg.dataset == "synthetic_shapes":
        return
    if cfg.dataset == "prepared":
        from mae_search.prepare import read_manifest

        read_manifest(cfg.path)
        return
    root = _require_dir(cfg.path, f"data.path ({cfg.dataset})")
    if cfg.dataset == "cifar10":
        load_cifar10(root)  # about a second: every batch unpickled (arrays only) and its shape checked
    elif cfg.dataset == "stl10":
        stl = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
        for split in ("train", "test"):
            images = stl / f"{split}_X.bin"
            if not images.is_file():
                raise DataError(f"stl10: missing file {images}")
            if images.stat().st_size % (3 * 96 * 96):
                raise DataError(f"stl10: {images} is truncated or not an STL-10 image file")
            labels = stl / f"{split}_y.bin"
            count = images.stat().st_size // (3 * 96 * 96)
            if not labels.is_file() or labels.stat().st_size != count:
                raise DataError(f"stl10: {labels} is missing or does not hold {count} labels")
    elif cfg.dataset == "imagefolder" and not (
            (root / "train").is_dir() and any((root / d).is_dir() for d in ("val", "test"))):
        raise DataError(f"imagefolder: {root} must contain train/ and val/ (or test/) class folders")


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what}: data path {p} does not exist or is not a directory")
    return p


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


def load_cifar10(root: str | Path) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 'python version' (cifar-10-batches-py/data_batch_1..5, test_batch)."""
    root = _require_dir(root, "cifar10")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    meta = _unpickle(root / "batches.meta")
    classes = tuple(meta["label_names"])

    def read(names: list[str]) -> ImageSet:
        batches = [_cifar_batch(root / n) for n in names]
        data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([b[1] for b in batches])
        return ImageSet(torch.from_numpy(data), torch.from_numpy(labels), classes)

    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"])


def _read_stl_images(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"stl10: missing file {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise DataError(f"stl10: {path} is truncated or not an STL-10 image file")
    # STL-10 stores column-major (N, C, W, H); transpose to (N, C, H, W).
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


def _read_stl_labels(path: Path, count: int) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"stl10: missing file {path}")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # file labels are 1..10
    if labels.size != count:
        raise DataError(f"stl10: {path} has {labels.size} labels for {count} images")
    return torch.from_numpy(labels)


def load_stl10(root: str | Path) -> tuple[ImageSet, ImageSet, ImageSet]:
    """STL-10 binary release (stl10_binary/): unlabeled, train and test splits."""
    root = _require_dir(root, "stl10")
    if (root / "stl10_binary").is_dir():
        root = root / "stl10_binary"
    names_file = root / "class_names.txt"
    classes = tuple(names_file.read_text().split()) if names_file.is_file() else tuple(map(str, range(10)))
    splits = []
    for split in ("train", "test"):
        imgs = _read_stl_images(root / f"{split}_X.bin")
        splits.append(ImageSet(imgs, _read_stl_labels(root / f"{split}_y.bin", len(imgs)), classes))
    unlabeled_file = root / "unlabeled_X.bin"
    if unlabeled_file.is_file():
        imgs = _read_stl_images(unlabeled_file)
        unlabeled = ImageSet(imgs, torch.full((len(imgs),), -1, dtype=torch.int64), classes)
    else:
        unlabeled = splits[0]
    return unlabeled, splits[0], splits[1]


def square_image(size: int):
    """Shorter side resized to ``size``, then the centre square: how an ImageFolder's images are sized, in
    memory and when prepared (mae_search.prepare), so both paths see the same pictures."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])


def load_imagefolder(root: str | Path, size: int) -> tuple[ImageSet, ImageSet]:
    """An ImageFolder tree with train/ and val/ (or test/) sub-trees, resized to ``size``.

    Images are decoded once into memory, so this suits data sets up to a few
    hundred thousand small images (STL-10/ImageNet-100 scale at low resolution).
    """
    from torchvision import datasets, transforms

    root = _require_dir(root, "imagefolder")
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise DataError(f"imagefolder: {root} must contain train/ and val/ (or test/) class folders")
    tf = transforms.Compose([square_image(size), transforms.PILToTensor()])

    def read(path: Path) -> ImageSet:
        ds = datasets.ImageFolder(str(path), transform=tf)
        if len(ds) == 0:
            raise DataError(f"imagefolder: no images under {path}")
        imgs = torch.stack([ds[i][0] for i in range(len(ds))])
        return ImageSet(imgs, torch.tensor(ds.targets, dtype=torch.int64), tuple(ds.classes))

    return read(root / "train"), read(val_dir)


def _resize(images: ImageSet, size: int) -> ImageSet:
    if images.images.shape[-1] == size:
        return images
    x = F.interpolate(images.images.float(), size=(size, size), mode="bilinear", antialias=True)
    return ImageSet(x.round().clamp(0, 255).to(torch.uint8), images.labels, images.classes)


def load_data(cfg: DataConfig, model: ModelConfig, seed: int = 0) -> DataSplits:
    """Load the configured data set at the model's image size; the labelled split cut to ``num_labelled``."""
    splits = _load_splits(cfg, model.img_size, seed)
    if cfg.num_labelled is not None:
        splits.full_train = None  # an explicit labelled budget holds at every epoch, the last included
        if cfg.num_labelled < len(splits.train):
            # A fixed subset: the first images (every loader keeps a fixed order), the same for every trial.
            t = splits.train
            splits.train = ImageSet(t.images[: cfg.num_labelled], t.labels[: cfg.num_labelled], t.classes)
    if cfg.final_eval == "subset":
        splits.full_train = splits.full_test = None
    return splits


def _load_splits(cfg: DataConfig, size: int, seed: int) -> DataSplits:
    if cfg.dataset == "synthetic_shapes":
        train = synthetic_shapes(cfg.num_train, size, seed=10_000 + seed)
        test = synthetic_shapes(cfg.num_test, size, seed=20_000 + seed)
        return DataSplits(train, train, test)
    if cfg.dataset == "cifar10":
        train, test = load_cifar10(cfg.path)
        train, test = _resize(train, size), _resize(test, size)
        return DataSplits(train, train, test)
    if cfg.dataset == "stl10":
        unlabeled, train, test = (_resize(s, size) for s in load_stl10(cfg.path))
        return DataSplits(unlabeled, train, test)
    if cfg.dataset == "prepared":
        from mae_search.stream import load_prepared

        prepared = load_prepared(cfg.path, size, cfg.eval_images, cfg.decode_workers, cfg.shuffle_shards)
        return DataSplits(prepared.pretrain, prepared.train, prepared.test, prepared.full_train,
                          prepared.full_test)
    train, test = load_imagefolder(cfg.path, size)
    return DataSplits(train, train, test)


# --------------------------------------------------------------------------- batches

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


@functools.cache
def _mean_std(device: torch.device, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation constants, copied to each device once (a host-to-device copy per batch would sync)."""
    if channels == 3:
        return MEAN.to(device).view(1, 3, 1, 1), STD.to(device).view(1, 3, 1, 1)
    return torch.full((1, channels, 1, 1), 0.5, device=device), torch.full((1, channels, 1, 1), 0.25, device=device)


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised with ImageNet statistics."""
    mean, std = _mean_std(images_u8.device, images_u8.shape[1])
    return (images_u8.float() / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, back to [0, 1] floats (not clamped)."""
    mean, std = _mean_std(images.device, images.shape[1])
    return images * std + mean


def draw_crop_flip(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random numbers of ``n`` crops and flips, (n, 5) uniforms on the CPU.

    The trainer draws a whole epoch's at once and copies them to the device in
    one transfer, so no training step waits on a host-to-device copy.
    """
    return torch.rand(n, 5, generator=generator)


def crop_flip(
    images: torch.Tensor, uniforms: torch.Tensor, scale: tuple[float, float], hflip: bool
) -> torch.Tensor:
    """Batched RandomResizedCrop (ratio 3/4..4/3) + horizontal flip via one affine ``grid_sample``.

    Works on float images of any batch size on any device; sample i's crop box
    and flip come from ``uniforms[i]`` (see :func:`draw_crop_flip`), on the images' device.
    """
    area = scale[0] + (scale[1] - scale[0]) * uniforms[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniforms[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (uniforms[:, 2] * 2 - 1) * (1 - w)
    cy = (uniforms[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(uniforms[:, 4] < 0.5, -1.0, 1.0) if hflip else torch.ones_like(w)
    zero = torch.zeros_like(w)
    theta = torch.stack([w * flip, zero, cx, zero, h, cy], dim=1).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop_flip(
    images: torch.Tensor, scale: tuple[float, float], hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`crop_flip` with fresh random numbers from ``generator`` (reproducible per generator state)."""
    uniforms = draw_crop_flip(images.shape[0], generator).to(images.device)
    return crop_flip(images, uniforms, scale, hflip)


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch, sharded by rank; the last partial batch is dropped.

    Every rank draws the same permutation (same generator state) and takes its
    own stride, which is what DistributedSampler does, without a DataLoader.
    """
    # Every rank gets the same number of images (the tail beyond a multiple of world_size is dropped), so
    # every rank takes the same number of steps: one more on one rank would leave DDP waiting forever.
    perm = torch.randperm(n, generator=generator)[: n - n % world_size][rank::world_size]
    usable = (len(perm) // batch_size) * batch_size
    if usable == 0:
        raise DataError(f"data set of {n} images is smaller than one batch of {batch_size} per worker")
    return list(perm[:usable].split(batch_size))
