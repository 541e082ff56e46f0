"""Representation and reconstruction metrics for a (partly) trained MAE.

* linear probe: frozen encoder, features extracted once, BatchNorm (no affine)
  + linear head as in the paper's protocol, trained with SGD on the labelled split;
* k-NN: cosine-similarity weighted vote (k=20, T=0.07, as in DINO/InstDisc);
* reconstruction PSNR and masked high-frequency (Laplacian L1) error, both in
  [0, 1] pixel space on removed patches only, so ratios/settings compare fairly;
* a PNG grid: original | masked | reconstruction | reconstruction + visible.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mae_search.config import EvalConfig
from mae_search.data import ImageSet, denormalize, normalize
from mae_search.losses import laplacian, pixel_mask
from mae_search.masking import patchify, unpatchify
from mae_search.model import MaskedAutoencoderViT


@torch.no_grad()
def extract_features(
    model: MaskedAutoencoderViT, images: ImageSet, pool: str, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Frozen-encoder features for every image: CLS token or mean of patch tokens."""
    model.eval()
    feats = []
    for chunk in images.images.split(batch_size):
        tokens = model.forward_features(normalize(chunk.to(device))).float()
        feats.append(tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1))
    return torch.cat(feats)


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    epochs: int = 30, seed: int = 0,
) -> float:
    """Top-1 of BatchNorm1d(affine=False) + Linear trained on frozen features (SGD, cosine lr)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = int(train_y.max().item()) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    head = head.to(train_x.device)
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    batch = min(256, len(train_x))
    steps = epochs * math.ceil(len(train_x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=gen).to(train_x.device)
        for idx in perm.split(batch):
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    k: int = 20, temperature: float = 0.07,
) -> float:
    """Weighted k-NN top-1 on L2-normalised features."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    num_classes = int(train_y.max().item()) + 1
    k = min(k, len(train_x))
    correct = 0
    for xs, ys in zip(test_x.split(512), test_y.split(512), strict=True):
        sims, idx = (xs @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(xs), num_classes, device=xs.device)
        votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == ys).sum().item()
    return correct / len(test_x)


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT, images_u8: torch.Tensor, mask_ratio: float, norm_pix: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Original, reconstruction and pixel mask in [0, 1] space: (B, C, H, W) x2 and (B, 1, H, W).

    With norm_pix_loss the decoder predicts per-patch normalised pixels; they
    are mapped back with each target patch's own mean/std before comparing.
    """
    model.eval()
    p, c = model.cfg.patch_size, model.cfg.in_chans
    imgs = normalize(images_u8)
    out = model(imgs, mask_ratio)
    pred = out.pred.float()
    if norm_pix:
        target = patchify(imgs, p)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    recon = denormalize(unpatchify(pred, p, c)).clamp(0, 1)
    original = images_u8.float() / 255.0
    return original, recon, pixel_mask(out.mask, p)


def reconstruction_metrics(original: torch.Tensor, recon: torch.Tensor, mask_px: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and Laplacian L1 error over removed pixels only, images in [0, 1]."""
    c = original.shape[1]
    denom = (mask_px.sum() * c).clamp(min=1)
    mse = (((recon - original) ** 2) * mask_px).sum() / denom
    hf = ((laplacian(recon) - laplacian(original)).abs() * mask_px).sum() / denom
    return {"psnr": (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).item(), "masked_hf_error": hf.item()}


def save_reconstruction_grid(
    original: torch.Tensor, recon: torch.Tensor, mask_px: torch.Tensor, path: str | Path, upscale: int = 4
) -> Path:
    """Rows of original | masked | reconstruction | reconstruction with visible patches pasted back."""
    from torchvision.utils import save_image

    masked = original * (1 - mask_px) + 0.5 * mask_px
    pasted = original * (1 - mask_px) + recon * mask_px
    rows = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1).cpu()
    if upscale > 1:
        rows = F.interpolate(rows, scale_factor=upscale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, path, nrow=4, padding=2, pad_value=1.0)
    return path


def evaluate(
    model: MaskedAutoencoderViT,
    train: ImageSet,
    test: ImageSet,
    cfg: EvalConfig,
    mask_ratio: float,
    norm_pix: bool,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics for one model state, on fixed splits and a fixed masking seed (comparable across epochs)."""
    metrics: dict[str, float] = {}
    if (train.labels >= 0).any():
        tr_x = extract_features(model, train, cfg.probe_pool, device)
        te_x = extract_features(model, test, cfg.probe_pool, device)
        tr_y, te_y = train.labels.to(device), test.labels.to(device)
        metrics["linear_probe_acc"] = linear_probe_accuracy(tr_x, tr_y, te_x, te_y, cfg.probe_epochs, seed)
        metrics["knn_acc"] = knn_accuracy(tr_x, tr_y, te_x, te_y, cfg.knn_k)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        sample = test.images[: min(len(test), 512)].to(device)
        original, recon, mask_px = reconstruct(model, sample, mask_ratio, norm_pix)
    metrics.update(reconstruction_metrics(original, recon, mask_px))
    return metrics
