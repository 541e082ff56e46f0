"""Supervised fine-tuning of a pre-trained encoder: full (every block) and partial (the last k blocks).

The recipe is facebookresearch/mae's main_finetune.py, scaled by configuration:
AdamW with layer-wise lr decay (timm's ``param_groups_layer_decay``: block i
gets ``layer_decay ** (depth + 1 - i)`` of the lr), per-step warm-up then
cosine, label smoothing, drop path, gradient clipping, global-average-pooled
features into a linear head, and optionally mixup/cutmix (timm's ``Mixup``).
Images in memory stay on the device, a prepared set's are streamed
(:mod:`mae_search.data.stream`); either way they are cropped/flipped a batch at a
time, as in pre-training. Under DDP every rank trains on its shard of the labelled set
(gradients averaged by the wrapper) and evaluates its shard of the test set;
the counts are summed, so every rank returns the same accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mae_search.config import FinetuneConfig, ModelConfig
from mae_search.data.memory import crop_flip, normalize
from mae_search.data.stream import Labelled
from mae_search.mae.model import ViTClassifier
from mae_search.training.schedule import lr_at


@dataclass
class FinetuneResult:
    accuracies: dict[str, float]  # top-1 on each split it was scored on (val, test), in [0, 1]
    time_s: float  # wall time of the fine-tuning run (training and evaluation)

    @property
    def accuracy(self) -> float:
        """Top-1 on the test split (or on the one split it was scored on)."""
        return self.accuracies.get("test", next(iter(self.accuracies.values())))


def build_classifier(encoder: dict[str, torch.Tensor], model_cfg: ModelConfig, num_classes: int,
                     cfg: FinetuneConfig) -> ViTClassifier:
    """Classifier from encoder weights; with ``cfg.blocks`` only the last k blocks, fc_norm and head train."""
    model = ViTClassifier.from_encoder(encoder, model_cfg, num_classes, cfg.drop_path)
    if cfg.blocks is not None:
        first_trained = model_cfg.depth - cfg.blocks
        for name, p in model.named_parameters():
            block = int(name.split(".")[1]) if name.startswith("blocks.") else None
            p.requires_grad = name.startswith(("fc_norm", "head")) or (block is not None and block >= first_trained)
    return model


def make_finetune_optimizer(model: ViTClassifier, lr: float, cfg: FinetuneConfig) -> torch.optim.AdamW:
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=("cls_token", "pos_embed"),
                                      layer_decay=cfg.layer_decay)
    for g in groups:
        g["base_lr"] = lr * g.pop("lr_scale")
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def make_mixup(cfg: FinetuneConfig, num_classes: int) -> Callable | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


@contextmanager
def numpy_seeded(*words: int) -> Iterator[None]:
    """numpy's global generator seeded from ``words`` for the block, and given back after it.

    timm's Mixup draws its mixing weights, its choice of mixup or cutmix and the cutmix boxes from
    numpy's global generator; seeding it here makes those draws, like every other draw of a trial,
    follow from the trial's seed.
    """
    state = np.random.get_state()
    np.random.seed(np.random.SeedSequence(list(words)).generate_state(1))
    try:
        yield
    finally:
        np.random.set_state(state)


def finetune(
    encoder: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    train: Labelled,
    test: Labelled | dict[str, Labelled],
    cfg: FinetuneConfig,
    *,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    use_amp: bool = False,
) -> FinetuneResult:
    """Fine-tune a classifier initialised from ``encoder`` on ``train``; top-1 on ``test`` (a split, or
    several by name: one fine-tuning scored on the validation and the test split).

    Randomness (head init, drop path, batches, crops, mixup and cutmix) comes from ``seed`` (and the
    rank) alone, so the same encoder and seed give the same accuracy, and a random init run through
    here is the from-scratch reference.
    """
    start = time.perf_counter()
    num_classes = len(train.classes)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), numpy_seeded(seed, rank):
        torch.manual_seed(seed)
        model = build_classifier(encoder, model_cfg, num_classes, cfg).to(device)
        net = wrap_model(model) if wrap_model and world_size > 1 else model
        lr = cfg.blr * cfg.batch_size * world_size / 256
        optimizer = make_finetune_optimizer(model, lr, cfg)
        mixup = make_mixup(cfg, num_classes)
        train = train.to(device)
        gen = torch.Generator().manual_seed(seed)
        steps_per_epoch = len(train) // world_size // cfg.batch_size
        total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step = 0
        net.train()
        for epoch in range(cfg.epochs):
            batches = train.shuffled(cfg.batch_size, steps_per_epoch, gen, seed, epoch, device, rank,
                                       world_size)
            for images, y, u in batches:
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, g["base_lr"], warmup, total, 0.0)
                x = crop_flip(normalize(images), u, cfg.crop_scale, hflip=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if mixup is not None:
                        x, soft = mixup(x, y)
                        loss = torch.sum(-soft * F.log_softmax(net(x).float(), dim=-1), dim=-1).mean()
                    else:
                        loss = F.cross_entropy(net(x).float(), y, label_smoothing=cfg.label_smoothing)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        targets = test if isinstance(test, dict) else {"test": test}
        accuracies = {split: classifier_accuracy(model, data, device, rank, world_size, use_amp)
                      for split, data in targets.items()}
    return FinetuneResult(accuracies=accuracies, time_s=time.perf_counter() - start)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, test: Labelled, device: torch.device, rank: int = 0,
                        world_size: int = 1, use_amp: bool = False, batch_size: int = 256) -> float:
    """Top-1 over the whole test split; each rank scores its part of it and the counts are summed."""
    model.eval()
    correct = torch.zeros((), device=device)
    for x, y in test.in_order(batch_size, rank, world_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(normalize(x.to(device)))
        correct += (logits.argmax(1) == y.to(device)).sum()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
    return correct.item() / len(test)
