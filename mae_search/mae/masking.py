"""Patch bookkeeping and random masking.

Kept apart from the model so tests (and the losses) can use the exact same
patchify / masking conventions. Conventions follow facebookresearch/mae:
``mask`` is 1 for a *removed* patch and 0 for a visible one, and
``ids_restore`` undoes the per-sample shuffle.
"""

from __future__ import annotations

import math

import numpy as np
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
    return mask_patches(x, mask_ratio, "random")


def mask_patches(
    x: torch.Tensor, mask_ratio: float, strategy: str = "random"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask ``N - int(N * (1 - ratio))`` patches of each sample by ``strategy`` (paper Table 1f):

    - ``random``: uniformly, as the paper's default;
    - ``block``: rectangles of random size and aspect ratio (BEiT's block-wise masking) until the count
      is reached, so whole regions are removed;
    - ``grid``: one patch of every 2 x 2 group kept (ratio 0.75 only; the kept corner drawn per sample).

    Every strategy is an order of the patches, visible ones first: the same gather and ``ids_restore``
    follow (see :func:`random_masking` for the outputs).
    """
    b, n, d = x.shape
    keep = num_kept(n, mask_ratio)
    noise = torch.rand(b, n, device=x.device)
    if strategy != "random":  # removed patches sort after every visible one, each group in random order
        removed = block_mask(b, n, n - keep) if strategy == "block" else grid_mask(b, n)
        noise = noise + removed.to(x.device, torch.float32)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


BLOCK_MIN_PATCHES = 4  # BEiT's smallest block (16 at 14 x 14 patches; 4 suits the 8 x 8 of the tiny models)
BLOCK_ASPECT = (0.3, 1 / 0.3)
BLOCK_ATTEMPTS = 10  # rectangles tried before a sample's remaining patches are removed one by one


def block_mask(b: int, n: int, count: int) -> torch.Tensor:
    """(b, n) bool, ``count`` True per row: random rectangles (area from BLOCK_MIN_PATCHES up to what is
    left, aspect ratio log-uniform in BLOCK_ASPECT) added while they remove new patches without passing
    ``count``, as BEiT's MaskingGenerator; a sample its rectangles leave short is completed with random
    patches. The random numbers come from torch's generator, so a seed fixes the masks."""
    side = math.isqrt(n)
    rolls = torch.rand(b, 8 * BLOCK_ATTEMPTS, 4).numpy()  # area, aspect, top, left per attempt
    fill = torch.rand(b, n).numpy()
    log_lo, log_hi = math.log(BLOCK_ASPECT[0]), math.log(BLOCK_ASPECT[1])
    out = np.zeros((b, side, side), dtype=bool)
    for grid, rows, order in zip(out, rolls, fill, strict=True):
        masked, failures = 0, 0
        for u_area, u_aspect, u_top, u_left in rows:
            if masked >= count or failures >= BLOCK_ATTEMPTS:
                break
            left = count - masked
            area = BLOCK_MIN_PATCHES + u_area * max(0, left - BLOCK_MIN_PATCHES)
            aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            top, lft = int(u_top * (side - h + 1)), int(u_left * (side - w + 1))
            region = grid[top:top + h, lft:lft + w]
            new = h * w - int(region.sum())
            if not (0 < h < side and 0 < w < side and 0 < new <= left):
                failures += 1
                continue
            region[:] = True
            masked += new
        if masked < count:  # rectangles left it short: random patches make up the count
            flat = grid.reshape(-1)
            free = np.flatnonzero(~flat)
            flat[free[np.argsort(order[free])[: count - masked]]] = True
    return torch.from_numpy(out.reshape(b, n))


def grid_mask(b: int, n: int) -> torch.Tensor:
    """(b, n) bool: all but one patch of every 2 x 2 group removed, the kept corner drawn per sample."""
    side = math.isqrt(n)
    rows = torch.arange(side).view(side, 1).expand(side, side).reshape(-1)
    cols = torch.arange(side).view(1, side).expand(side, side).reshape(-1)
    corner = torch.randint(0, 4, (b, 1))
    kept = ((rows % 2) == corner // 2) & ((cols % 2) == corner % 2)
    return ~kept


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
