"""What the decoder reconstructs for each removed patch (the paper's Table 1d), as one interface.

- ``pixel``: the patch's pixels (the images as the encoder sees them: normalised by the data set's
  channel statistics), no further normalisation.
- ``norm_pix``: each patch normalised by its own mean and variance (the paper's default, ``norm_pix_loss``).
- ``pca``: the patch's coefficients on the top-k principal components of training patches; the basis
  is fitted once per run from a sample of its training patches (:meth:`PCATarget.fit`) and kept in the
  run's checkpoint, so a resumed run and its reconstructions use the same one.
- ``hog``: MaskFeat's target (Wei et al. 2022), histograms of oriented gradients: per channel,
  central-difference gradients over the whole image, unsigned orientations in ``bins`` hard bins,
  magnitudes averaged over ``cells x cells`` cells per patch, the patch's vector L2-normalised.
  Computed as scikit-image's ``hog`` computes one channel's cell histograms (tests/test_targets.py).

The paper's fourth target, dVAE tokens (BEiT), needs a tokenizer pre-trained on a large image set,
which cannot be downloaded where mae-search runs; it is not offered (README).

Every target maps images (B, C, H, W) to per-patch vectors (B, N, dim); the decoder predicts ``dim``
values per patch. :meth:`pixels` turns a prediction back into pixel patches where the target allows it
(HOG does not: no reconstruction grid, PSNR or Laplacian term for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_search.config import LossConfig, ModelConfig
from mae_search.mae.masking import patchify

TARGETS = ("pixel", "norm_pix", "pca", "hog")


class Target:
    """Images -> per-patch regression targets; ``dim`` values per patch."""

    name: str
    dim: int
    has_pixels: bool = True

    def __init__(self, patch_size: int, channels: int) -> None:
        self.patch_size, self.channels = patch_size, channels

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pixels(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches in pixel space (B, N, p*p*C): de-normalised with each patch's true statistics,
        and with those of the image's visible pixels only (what the model could know)."""
        raise NotImplementedError

    def as_images(self, pred: torch.Tensor, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prediction and its target as image patches (B, N, p*p*C), for the Laplacian term; None
        for a target without pixels."""
        return pred, self(imgs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of it (a fitted basis); nothing for the fixed targets."""
        return {}


class PixelTarget(Target):
    def __init__(self, patch_size: int, channels: int, norm: bool) -> None:
        super().__init__(patch_size, channels)
        self.name, self.norm = ("norm_pix" if norm else "pixel"), norm
        self.dim = patch_size * patch_size * channels

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)
        if self.norm:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def pixels(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.norm:
            return pred, pred
        target = patchify(imgs, self.patch_size)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        visible = (1 - mask).unsqueeze(-1)
        count = visible.sum(1, keepdim=True) * target.shape[-1]
        v_mean = (target * visible).sum((1, 2), keepdim=True) / count
        v_var = (((target - v_mean) ** 2) * visible).sum((1, 2), keepdim=True) / count
        return pred * (var + 1e-6).sqrt() + mean, pred * (v_var + 1e-6).sqrt() + v_mean


class PCATarget(Target):
    """Coefficients of each patch on a fitted basis: ``(patch - mean) @ basis``, basis (p*p*C, k)."""

    name = "pca"

    def __init__(self, patch_size: int, channels: int, mean: torch.Tensor, basis: torch.Tensor) -> None:
        super().__init__(patch_size, channels)
        self.mean, self.basis = mean, basis
        self.dim = basis.shape[1]

    @classmethod
    def fit(cls, imgs: torch.Tensor, patch_size: int, components: int, max_patches: int,
            gen: torch.Generator) -> PCATarget:
        """The top ``components`` principal directions of up to ``max_patches`` patches of ``imgs``."""
        patches = patchify(imgs.float(), patch_size).reshape(-1, patch_size * patch_size * imgs.shape[1])
        if len(patches) > max_patches:
            patches = patches[torch.randperm(len(patches), generator=gen)[:max_patches].to(patches.device)]
        mean = patches.mean(0)
        _, _, vh = torch.linalg.svd(patches - mean, full_matrices=False)
        basis = vh[:components].T.contiguous()
        basis = basis * torch.where(basis.sum(0) < 0, -1.0, 1.0)  # a sign per component, fixed by convention
        return cls(patch_size, imgs.shape[1], mean, basis)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        return (patchify(imgs, self.patch_size) - self.mean) @ self.basis

    def pixels(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = pred @ self.basis.T + self.mean
        return patches, patches

    def as_images(self, pred: torch.Tensor, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return pred @ self.basis.T + self.mean, patchify(imgs, self.patch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu(), "basis": self.basis.cpu()}


class HOGTarget(Target):
    """Per channel, ``bins`` orientation histograms of ``cells x cells`` cells per patch (MaskFeat)."""

    name = "hog"
    has_pixels = False

    def __init__(self, patch_size: int, channels: int, cells: int, bins: int = 9) -> None:
        super().__init__(patch_size, channels)
        self.cells, self.bins, self.cell = cells, bins, patch_size // cells
        self.dim = channels * bins * cells * cells

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        hist = cell_histograms(imgs, self.cell, self.bins)  # (B, C, bins, H/cell, W/cell)
        b, c, bins, gh, gw = hist.shape
        side = gh // self.cells
        # (B, C, bins, side, cells, side, cells) -> (B, side, side, C, bins, cells, cells): one vector per patch
        per_patch = hist.reshape(b, c, bins, side, self.cells, side, self.cells).permute(0, 3, 5, 1, 2, 4, 6)
        return F.normalize(per_patch.reshape(b, side * side, self.dim), dim=-1)

    def pixels(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("a HOG target has no pixel reconstruction")

    def as_images(self, pred: torch.Tensor, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


def cell_histograms(imgs: torch.Tensor, cell: int, bins: int) -> torch.Tensor:
    """Orientation histograms (B, C, bins, H/cell, W/cell) of each channel, as scikit-image's ``hog``
    computes them before block normalisation: gradients by central differences (zero on the image's
    border rows and columns), unsigned orientation in [0, 180) degrees, each pixel's magnitude added
    to its orientation's bin, the sums divided by the cell's pixel count."""
    g_row, g_col = torch.zeros_like(imgs), torch.zeros_like(imgs)
    g_row[..., 1:-1, :] = imgs[..., 2:, :] - imgs[..., :-2, :]
    g_col[..., :, 1:-1] = imgs[..., :, 2:] - imgs[..., :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180
    index = (orientation / (180 / bins)).floor().long().clamp(max=bins - 1)
    votes = torch.zeros(*imgs.shape[:2], bins, *imgs.shape[2:], dtype=imgs.dtype, device=imgs.device)
    votes.scatter_(2, index.unsqueeze(2), magnitude.unsqueeze(2))
    b, c = imgs.shape[:2]
    pooled = F.avg_pool2d(votes.reshape(b, c * bins, *imgs.shape[2:]), cell)
    return pooled.reshape(b, c, bins, *pooled.shape[-2:])


def target_dim(loss: LossConfig, model: ModelConfig) -> int:
    """Values the decoder predicts per patch for the configured target (known before a PCA basis is fitted)."""
    p, c = model.patch_size, model.in_chans
    return {"pca": loss.pca_components, "hog": c * loss.hog_bins * loss.hog_cells ** 2}.get(loss.target, p * p * c)


def make_target(name: str, patch_size: int, channels: int, *, hog_cells: int = 2, hog_bins: int = 9,
                pca: tuple[torch.Tensor, torch.Tensor] | None = None) -> Target:
    """The target ``name``; ``pca`` is a fitted basis's (mean, basis) (:meth:`PCATarget.fit` makes one)."""
    if name in ("pixel", "norm_pix"):
        return PixelTarget(patch_size, channels, norm=name == "norm_pix")
    if name == "hog":
        return HOGTarget(patch_size, channels, hog_cells, hog_bins)
    if name == "pca":
        if pca is None:
            raise ValueError("a PCA target needs its fitted basis")
        return PCATarget(patch_size, channels, *pca)
    raise ValueError(f"unknown reconstruction target '{name}' (known: {', '.join(TARGETS)})")
