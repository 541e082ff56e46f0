"""The MAE objective and the two research terms, each a plain function of tensors.

total = mse + freq_weight * laplacian_l1 + unif_weight * uniformity, the mse on the reconstruction
target (mae/targets.py: pixels, normalised pixels, PCA coefficients or HOG)

All three terms are always returned (detached where unweighted) so every run
logs them, and ablations compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mae_search.config import LossConfig
from mae_search.mae.masking import unpatchify
from mae_search.mae.targets import PixelTarget, Target

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def patch_targets(imgs: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Patchified pixel targets, optionally normalised per patch (the paper's norm_pix_loss)."""
    return PixelTarget(patch_size, imgs.shape[1], norm_pix)(imgs)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over removed patches only."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def laplacian(imgs: torch.Tensor) -> torch.Tensor:
    """Per-channel 3x3 Laplacian (zero padding), same shape as the input."""
    c = imgs.shape[1]
    kernel = _LAPLACIAN.to(imgs.device, imgs.dtype).expand(c, 1, 3, 3)
    return F.conv2d(imgs, kernel, padding=1, groups=c)


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch mask (B, N) -> pixel mask (B, 1, H, W)."""
    per_pixel = mask.unsqueeze(-1).expand(-1, -1, patch_size * patch_size)
    return unpatchify(per_pixel, patch_size, 1)


def masked_laplacian_l1(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, channels: int
) -> torch.Tensor:
    """L1 between the Laplacians of predicted and target images, on removed pixels only.

    Both are unpatchified first so the operator sees whole images; the mean is
    over masked pixels and channels, so the term's scale does not move with the
    mask ratio.
    """
    pred_img = unpatchify(pred, patch_size, channels)
    tgt_img = unpatchify(target, patch_size, channels)
    m = pixel_mask(mask, patch_size)
    diff = (laplacian(pred_img) - laplacian(tgt_img)).abs() * m
    return diff.sum() / (m.sum() * channels).clamp(min=1)


def uniformity(latent: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola uniformity, log E exp(-t ||z_i - z_j||^2), on mean-pooled patch tokens.

    Lower means features are spread over the hypersphere; a collapsed batch
    scores 0, the maximum. The CLS token is excluded from the pool.
    """
    z = F.normalize(latent[:, 1:, :].float().mean(dim=1), dim=-1)
    if z.shape[0] < 2:
        return z.new_zeros(())
    sq_dists = torch.pdist(z, p=2).pow(2)
    return sq_dists.mul(-t).exp().mean().log()


@dataclass
class LossTerms:
    total: torch.Tensor
    mse: torch.Tensor
    freq: torch.Tensor | None  # None: unweighted and not measured on this step
    unif: torch.Tensor | None


def mae_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    latent: torch.Tensor,
    cfg: LossConfig,
    target: Target,
    measure_unweighted: bool = True,
) -> LossTerms:
    """Combine the terms.

    A term with weight 0 adds nothing to the gradient; it is only computed (without
    gradient, for logging) when ``measure_unweighted`` -- the trainer asks on a
    sample of steps, so logging the research terms costs almost nothing. The Laplacian
    term compares images: the pixel targets' patches as they are, a PCA prediction mapped
    back to pixels; a HOG target has none (the term is not measured).
    """
    # Every term in fp32, autocast or not: under bf16 autocast the Laplacian's convolution would run in
    # bf16 (0.0048 against 0.0036 in fp32 on the same input), and the terms would drift with the device.
    with torch.autocast(pred.device.type, enabled=False):
        pred, imgs = pred.float(), imgs.float()
        total = mse = masked_mse(pred, target(imgs), mask.float())
        freq = unif = None
        if cfg.freq_weight > 0 or measure_unweighted:
            images = target.as_images(pred, imgs)
            if images is not None:
                with torch.set_grad_enabled(cfg.freq_weight > 0 and torch.is_grad_enabled()):
                    freq = masked_laplacian_l1(*images, mask.float(), target.patch_size, imgs.shape[1])
                total = total + cfg.freq_weight * freq
        if cfg.unif_weight > 0 or measure_unweighted:
            with torch.set_grad_enabled(cfg.unif_weight > 0 and torch.is_grad_enabled()):
                unif = uniformity(latent.float())
            total = total + cfg.unif_weight * unif
    return LossTerms(total=total, mse=mse, freq=_detach(freq), unif=_detach(unif))


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
