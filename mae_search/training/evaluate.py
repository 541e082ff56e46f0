"""Representation and reconstruction metrics for a (partly) trained MAE, and the reference rows.

* linear probe, as the paper (main_linprobe.py): frozen encoder, the CLS token
  after the encoder's final norm, BatchNorm1d without affine (eps 1e-6) then a
  linear head, trained with SGD on the labelled split;
* k-NN: cosine-similarity weighted vote (k=20, T=0.07, as in DINO/InstDisc);
* full and partial fine-tuning (:mod:`mae_search.training.finetune`);
* reconstruction on held-out images under a fixed masking seed: masked MSE in
  the training target space, and PSNR / Laplacian (high-frequency) error in
  [0, 1] pixel space on removed pixels. Under norm-pix targets the prediction
  is a normalised patch; ``psnr`` maps it back with statistics of the
  *visible* pixels only (what a model could know), ``psnr_true_stats`` and
  ``masked_hf_error`` with each masked patch's true mean and variance (so they
  show structure, not brightness). Without norm-pix the two PSNRs agree;
* a PNG grid: original | masked | reconstruction | reconstruction + visible.

The reference rows -- the same seed's random initialisation and raw pixels --
go through the very same functions (:func:`evaluate_reference`). A split is
in memory or streamed from a prepared set (:mod:`mae_search.data.stream`); either
way the probe and k-NN hold only its features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mae_search.config import EvalConfig, FinetuneConfig, ModelConfig
from mae_search.data.memory import denormalize, normalize
from mae_search.data.stream import Labelled, PreparedSet
from mae_search.mae.losses import laplacian, masked_mse, pixel_mask
from mae_search.mae.masking import unpatchify
from mae_search.mae.model import MaskedAutoencoderViT, encoder_state_dict
from mae_search.mae.targets import Target
from mae_search.metrics import val_name
from mae_search.training.finetune import finetune

REFERENCE_KINDS = ("random_init", "raw_pixels")
RAW_PIXEL_SIZE = 32  # raw-pixel features are taken at most at 32 x 32 (3072 numbers), whatever the image size


Features = tuple[torch.Tensor, torch.Tensor]  # (N, D) features and (N,) labels, on one device


def has_labels(data: Labelled) -> bool:
    """Whether a labelled split really has labels (an unlabelled in-memory set carries -1)."""
    return bool(data.classes) if isinstance(data, PreparedSet) else bool((data.labels >= 0).any())


@torch.no_grad()
def extract_features(
    model: MaskedAutoencoderViT, data: Labelled, pool: str, device: torch.device, batch_size: int = 256
) -> Features:
    """Frozen-encoder features of every image, with labels: CLS token (the paper's probe) or mean of patch
    tokens. A streamed split is read once; only the features stay in memory (D numbers an image)."""
    model.eval()
    return collect_features(data.in_order(batch_size), len(data),
                            lambda images: pooled(model.forward_features(normalize(images.to(device))), pool))


def pooled(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """One feature per image from (B, 1 + L, D) tokens: the CLS token or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


def pixel_features(data: Labelled, device: torch.device) -> Features:
    """The raw-pixel reference: normalised pixels, area-downsampled to at most 32 x 32, flattened."""
    def flat_pixels(images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(device))
        if x.shape[-1] > RAW_PIXEL_SIZE:
            x = F.interpolate(x, size=(RAW_PIXEL_SIZE, RAW_PIXEL_SIZE), mode="area")
        return x.flatten(1)

    return collect_features(data.in_order(512), len(data), flat_pixels)


def collect_features(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
                     featurize: Callable[[torch.Tensor], torch.Tensor]) -> Features:
    """Float32 features and labels of every batch, written into two tensors allocated once for ``count``
    images (doubled should more come).

    Why not a list of per-batch features joined at the end: joining holds every
    feature twice at the end of the pass (ImageNet-1k's 1.28M training images
    through ViT-B: 3.9 GB of features, 7.9 GB while joining). Copying each batch's
    features out also frees its tokens, which a CLS view would keep alive (L + 1
    times the features' memory).
    """
    feats = labels = None
    filled = 0
    for images, y in batches:
        x = featurize(images)
        end = filled + len(x)
        if feats is None:
            feats = torch.empty(max(count, end), x.shape[1], device=x.device)
            labels = torch.empty(len(feats), dtype=torch.int64, device=x.device)
        elif end > len(feats):
            feats, labels = _grown(feats, filled, 2 * end), _grown(labels, filled, 2 * end)
        feats[filled:end] = x
        labels[filled:end] = y
        filled = end
        del x  # its tokens go before the next batch is read
    if feats is None:
        raise ValueError("no images to take features of: the split is empty")
    return feats[:filled], labels[:filled]


def _grown(rows: torch.Tensor, filled: int, size: int) -> torch.Tensor:
    bigger = rows.new_empty((size, *rows.shape[1:]))
    bigger[:filled] = rows[:filled]
    return bigger


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 50,
                     seed: int = 0, lr: float = 0.1) -> nn.Module:
    """BatchNorm1d(affine=False, eps=1e-6) + Linear trained on frozen features (SGD, momentum, cosine lr).

    The BatchNorm is a normaliser, not a learned layer: it makes the probe
    insensitive to feature scale, which is why the paper adds it.
    """
    gen = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)  # on the CPU: same draw on every device
    nn.init.zeros_(head[1].bias)
    head = head.to(train_x.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
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
    return head.eval()


@torch.no_grad()
def probe_accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (head(x).argmax(1) == y).float().mean().item()


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    k: int = 20, temperature: float = 0.07, test_chunk: int = 512, train_chunk: int = 16_384,
) -> float:
    """Weighted k-NN top-1 on L2-normalised features: each of the k nearest training features votes for
    its class with weight exp(similarity / temperature), as DINO's and MAE's k-NN evaluations do."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    correct = 0
    for xs, ys in zip(test_x.split(test_chunk), test_y.split(test_chunk), strict=True):
        sims, idx = nearest(xs, train_x, k, train_chunk)
        votes = torch.zeros(len(xs), num_classes, device=xs.device)
        votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == ys).sum().item()
    return correct / len(test_x)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest dot products of each query with the keys, and the keys' indices.

    The keys are compared ``chunk`` at a time, each block's top k merged into a
    running top k, so the similarities held at once are len(queries) x chunk,
    whatever the number of keys: a full-set evaluation (1.28M ImageNet training
    features) would otherwise hold a 512 x 1.28M matrix (2.6 GB) per block of queries.
    """
    best_sims, best_idx = None, None
    for start in range(0, len(keys), chunk):
        block = queries @ keys[start:start + chunk].T
        sims, idx = block.topk(min(k, block.shape[1]), dim=1)
        del block
        if best_sims is not None:
            sims, idx = torch.cat([best_sims, sims], dim=1), torch.cat([best_idx, idx + start], dim=1)
            sims, pos = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx.gather(1, pos)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


def split_key(name: str, split: str) -> str:
    """A metric's name for a split: ``val_<name>`` on the validation split, the plain name on test."""
    return val_name(name) if split == "val" else name


def feature_metrics(train: Features, targets: dict[str, Features], cfg: EvalConfig, seed: int) -> dict[str, float]:
    """Linear probe and k-NN on given features (encoder or raw pixels alike), fitted once on ``train`` and
    scored on each target split (``val``, ``test``), and how many images each split had (the report says
    which evaluation set a number comes from)."""
    tr_x, tr_y = train
    num_classes = int(max([tr_y.max().item()] + [y.max().item() for _, y in targets.values()])) + 1
    head = fit_linear_probe(tr_x, tr_y, num_classes, cfg.probe.epochs, seed, cfg.probe.lr)
    metrics = {"eval_train_images": float(len(tr_y))}
    for split, (x, y) in targets.items():
        metrics[split_key("linear_probe_acc", split)] = probe_accuracy(head, x, y)
        metrics[split_key("knn_acc", split)] = knn_accuracy(tr_x, tr_y, x, y, cfg.knn_k)
        metrics[f"eval_{split}_images"] = float(len(y))
    return metrics


def encoder_metrics(model: MaskedAutoencoderViT, train: Labelled, targets: dict[str, Labelled], cfg: EvalConfig,
                    device: torch.device, seed: int) -> dict[str, float]:
    """Linear probe and k-NN on the frozen encoder's features (a trial's and the random-init reference's)."""
    pool = cfg.probe.pool
    return feature_metrics(extract_features(model, train, pool, device),
                           {split: extract_features(model, data, pool, device) for split, data in targets.items()},
                           cfg, seed)


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT, images_u8: torch.Tensor, mask_ratio: float, target: Target,
    strategy: str = "random",
) -> dict[str, torch.Tensor]:
    """One masked forward pass on held-out images; the pieces every reconstruction metric needs.

    Returns ``original`` (B, C, H, W in [0, 1]), ``mask_px`` (B, 1, H, W), ``masked_mse`` (the
    training objective's MSE term on these images) and, for a target with pixels, ``recon``
    (de-normalised with visible-pixel statistics under norm-pix) and ``recon_true_stats`` (with each
    masked patch's true mean/variance; a PCA prediction is mapped back through its basis).
    """
    model.eval()
    p, c = model.cfg.patch_size, model.cfg.in_chans
    imgs = normalize(images_u8)
    out = model(imgs, mask_ratio, strategy)  # the masks the trial trains with
    pred = out.pred.float()
    rec = {"original": images_u8.float() / 255.0, "mask_px": pixel_mask(out.mask, p),
           "masked_mse": masked_mse(pred, target(imgs), out.mask)}
    if target.has_pixels:
        true_pred, visible_pred = target.pixels(pred, imgs, out.mask)
        rec["recon"] = denormalize(unpatchify(visible_pred, p, c)).clamp(0, 1)
        rec["recon_true_stats"] = denormalize(unpatchify(true_pred, p, c)).clamp(0, 1)
    return rec


def _psnr(original: torch.Tensor, recon: torch.Tensor, mask_px: torch.Tensor) -> float:
    mse = (((recon - original) ** 2) * mask_px).sum() / (mask_px.sum() * original.shape[1]).clamp(min=1)
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).item()


def reconstruction_metrics(rec: dict[str, torch.Tensor], split: str = "test") -> dict[str, float]:
    """Held-out masked MSE (in the target's space), and for a target with pixels the two PSNRs (dB) and
    the Laplacian L1 error, over removed pixels only."""
    mse = {split_key("test_mse", split): rec["masked_mse"].item()}
    if "recon" not in rec:  # HOG: nothing to compare pixels with
        return mse
    original, mask_px = rec["original"], rec["mask_px"]
    denom = (mask_px.sum() * original.shape[1]).clamp(min=1)
    hf = ((laplacian(rec["recon_true_stats"]) - laplacian(original)).abs() * mask_px).sum() / denom
    return {
        **mse,
        split_key("psnr", split): _psnr(original, rec["recon"], mask_px),
        split_key("psnr_true_stats", split): _psnr(original, rec["recon_true_stats"], mask_px),
        split_key("masked_hf_error", split): hf.item(),
    }


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


def due(when: str, final: bool) -> bool:
    """Whether a fine-tuning variant runs at this evaluation (``at``: never | end | every_eval)."""
    return when == "every_eval" or (when == "end" and final)


def finetune_metrics(
    model: MaskedAutoencoderViT, train: Labelled, targets: dict[str, Labelled], cfg: EvalConfig, final: bool,
    device: torch.device, seed: int, *, rank: int = 0, world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None, use_amp: bool = False,
) -> dict[str, float]:
    """Full and partial fine-tuning, where due: one run each, scored on every target split. Every rank
    must call this (fine-tuning is DDP-aware)."""
    metrics: dict[str, float] = {}
    variants: tuple[tuple[str, FinetuneConfig], ...] = (
        ("finetune", cfg.finetune), ("partial_finetune", cfg.partial_finetune))
    for name, ft in variants:
        if not due(ft.at, final):
            continue
        result = finetune(encoder_state_dict(model), model.cfg, train, targets, ft, device=device, seed=seed,
                          rank=rank, world_size=world_size, wrap_model=wrap_model, use_amp=use_amp)
        metrics.update({split_key(f"{name}_acc", split): acc for split, acc in result.accuracies.items()})
        metrics[f"{name}_time_s"] = result.time_s
    return metrics


def evaluate(
    model: MaskedAutoencoderViT,
    train: Labelled,
    targets: dict[str, Labelled],
    cfg: EvalConfig,
    mask_ratio: float,
    target: Target,
    device: torch.device,
    seed: int = 0,
    strategy: str = "random",
) -> dict[str, float]:
    """Probe and k-NN fitted on ``train`` and scored on each target split, reconstruction metrics on the
    first 512 images of each (rank 0 only; fine-tuning is separate).

    Fixed splits and a fixed masking seed make the numbers comparable across epochs.
    """
    metrics: dict[str, float] = {}
    if has_labels(train):
        metrics.update(encoder_metrics(model, train, targets, cfg, device, seed))
    fork_devices = [device] if device.type == "cuda" else []
    for split, data in targets.items():
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            sample = held_out_images(data)[:512].to(device)
            metrics.update(reconstruction_metrics(reconstruct(model, sample, mask_ratio, target, strategy), split))
    return metrics


def held_out_images(data: Labelled, count: int = 512) -> torch.Tensor:
    """The first ``count`` uint8 images of a split, in memory or streamed."""
    if isinstance(data, PreparedSet):
        return next(iter(data.in_order(count)))[0]
    return data.images[:count]


def evaluate_reference(kind: str, model_cfg: ModelConfig, train: Labelled, targets: dict[str, Labelled],
                       cfg: EvalConfig, device: torch.device, seed: int) -> dict[str, float]:
    """A reference row: ``random_init`` (the seed's untrained encoder through the full protocol; its
    fine-tuning is training from scratch, so it runs the from-scratch recipe, ``eval.scratch``) or
    ``raw_pixels`` (probe and k-NN on pixels), on the splits a trial's last epoch is evaluated on
    (validation and test)."""
    if kind == "raw_pixels":
        return feature_metrics(pixel_features(train, device),
                               {split: pixel_features(data, device) for split, data in targets.items()}, cfg, seed)
    if kind != "random_init":
        raise ValueError(f"unknown reference '{kind}' (known: {', '.join(REFERENCE_KINDS)})")
    torch.manual_seed(seed)  # the same initialisation as a trial of this seed (see Trainer)
    model = MaskedAutoencoderViT(model_cfg).to(device)
    metrics = encoder_metrics(model, train, targets, cfg, device, seed)
    return {**metrics, **finetune_metrics(model, train, targets, cfg.from_scratch(), True, device, seed)}
