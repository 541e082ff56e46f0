"""Patch bookkeeping and random masking.

Kept apart from the model so tests (and the losses) can use the exact same
patchify / masking conventions. Conventions follow facebookresearch/mae:
``mask`` is 1 for a *removed* patch and 0 for a visible one, and
``ids_restore`` undoes the per-sample shuffle.
"""

from __future__ import annotations

import math

import torch

from mae_search.config import MaskingConfig


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (p, p, C) inside."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of :func:`patchify` for square images."""
    b, n, _ = patches.shape
    p = patch_size
    side = int(math.isqrt(n))
    x = patches.reshape(b, side, side, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, side * p, side * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible tokens for a ratio: int(N * (1 - ratio)) as the official code, never fewer than one.

    Truncation, not rounding: at ratio 0.9 with 196 patches the official code
    keeps 19 tokens, rounding would keep 20.
    """
    return max(1, min(num_patches, int(num_patches * (1.0 - mask_ratio))))


def random_masking(
    x: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise.

    Returns the visible tokens (B, keep, D), the binary mask (B, N; 1 = removed)
    and ids_restore (B, N) that puts a [visible; masked] sequence back in order.
    """
    b, n, d = x.shape
    keep = num_kept(n, mask_ratio)
    noise = torch.rand(b, n, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


def scheduled_mask_ratio(cfg: MaskingConfig, epoch_progress: float) -> float:
    """Mask ratio in force at a fractional epoch (e.g. 2.5 = half-way through epoch 3).

    Without a curriculum this is the target ratio. With one, it moves from
    ``start_ratio`` (or ``start_fraction`` of the target) to ``mask_ratio`` over ``ramp_epochs`` (linearly or along a
    half cosine) and then stays at the target; ``constant`` holds the target
    throughout, which makes the schedule itself an ablation setting.
    """
    if not cfg.curriculum or cfg.schedule == "constant":
        return cfg.mask_ratio
    t = 1.0 if cfg.ramp_epochs == 0 else min(max(epoch_progress / cfg.ramp_epochs, 0.0), 1.0)
    if cfg.schedule == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return cfg.start + (cfg.mask_ratio - cfg.start) * t
