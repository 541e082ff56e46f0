"""Images in memory: the embedded synthetic set, batches, and on-device augmentation.

Small data sets are held as one uint8 tensor (N, C, H, W) with integer labels,
moved to the training device once, and augmented there a whole batch at a time
(random resized crop through one ``grid_sample`` call, random flip). That keeps
Python out of the per-sample path, which on small images is what makes a
classic per-sample DataLoader the bottleneck.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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

    # The two ways a loop reads a split; a streamed prepared set (data/stream.py) has the same two.
    def shuffled(self, batch_size: int, steps: int, gen: torch.Generator, seed: int, epoch: int,
                 device: torch.device, rank: int = 0, world_size: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's (uint8 images, labels, crop/flip uniforms) for ``steps`` steps of an epoch, on the device.

        The set is already on the device; the image indices and the uniforms are drawn on the CPU from
        ``gen`` and copied in one transfer each: a host-to-device copy inside the step would make the host
        wait for the device every step instead of queueing the next step's work. (``seed`` and ``epoch``
        order a streamed set's shards; ``gen`` holds them here.)
        """
        check_steps(len(self), batch_size, steps)
        order = torch.cat(epoch_batches(len(self), batch_size, gen, rank, world_size)[:steps])
        uniforms = draw_crop_flip(len(order), gen)
        pairs = zip(order.to(device).split(batch_size), uniforms.to(device).split(batch_size), strict=True)
        return ((self.images[idx], self.labels[idx], u) for idx, u in pairs)

    def in_order(self, batch_size: int = 256, rank: int = 0, world_size: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image of this rank's part once, with its label (an evaluation pass): rank r of w takes
        images r, r + w, ..., so the ranks' parts are disjoint and cover the split."""
        images, labels = self.images[rank::world_size], self.labels[rank::world_size]
        return zip(images.split(batch_size), labels.split(batch_size), strict=True)


def check_steps(images: int, batch_size: int, steps: int) -> None:
    if steps < 1:
        raise DataError(f"data set of {images} images is smaller than one batch of {batch_size} per worker")


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


FIXED_CROP_AREA = (224 / 256) ** 2  # the paper's fixed-size crop: 224 px from images resized to 256
JITTER = 0.4  # colour jitter strength: brightness, contrast and saturation factors in [0.6, 1.4]
LUMA = (0.2989, 0.587, 0.114)  # torchvision's grayscale weights


def augment(images_u8: torch.Tensor, uniforms: torch.Tensor, kind: str, scale: tuple[float, float],
            hflip: bool) -> torch.Tensor:
    """Pre-training augmentation of a batch, on its device (paper Table 1e), normalised:

    - ``none``: the images as they are (the centre view at the model's size), no flip;
    - ``crop_fixed``: a square crop of FIXED_CROP_AREA at a random position, and the flip;
    - ``crop_rand``: random resized crop (area in ``scale``, aspect 3/4-4/3) and the flip (the default);
    - ``crop_color``: ``crop_rand`` then colour jitter (brightness, contrast, saturation, each by a factor
      drawn in 1 +- JITTER, applied in that order; no hue), its factors drawn on the device from torch's
      generator (which the trainer seeds per epoch).
    """
    images = normalize(images_u8)
    if kind == "none":
        return images
    if kind == "crop_fixed":
        uniforms = torch.cat([uniforms[:, :1], torch.full_like(uniforms[:, 1:2], 0.5), uniforms[:, 2:]], dim=1)
        return crop_flip(images, uniforms, (FIXED_CROP_AREA, FIXED_CROP_AREA), hflip)
    images = crop_flip(images, uniforms, scale, hflip)
    if kind == "crop_color":
        factors = 1 + JITTER * (2 * torch.rand(images.shape[0], 3, device=images.device) - 1)
        images = standardize(colour_jitter(denormalize(images), factors))
    return images


def colour_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of [0, 1] images (B, 3, H, W) scaled by ``factors`` (B, 3), in that
    order, clamped to [0, 1] after each, as torchvision's ColorJitter does each adjustment."""
    brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in factors.unbind(1))
    luma = torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)
    x = (images * brightness).clamp(0, 1)
    mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = (x * luma).sum(1, keepdim=True)
    return ((x - gray) * saturation + gray).clamp(0, 1)


def standardize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> the normalised form :func:`normalize` gives."""
    mean, std = _mean_std(images.device, images.shape[1])
    return (images - mean) / std


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
