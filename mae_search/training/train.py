"""The MAE pre-training loop: usable on its own and as the body of a Ray Train worker.

``Trainer.fit`` runs epochs and hands each epoch's metrics to a callback; the
CLI prints them, the Ray worker reports them (with a checkpoint) to Ray Train.
Nothing in here knows about Ray, so the same code is what a bare run, a test
and a distributed trial execute.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mae_search.config import TrainConfig
from mae_search.data.load import DataSplits, load_data
from mae_search.data.memory import augment
from mae_search.mae.losses import mae_loss
from mae_search.mae.masking import scheduled_mask_ratio
from mae_search.mae.model import MaskedAutoencoderViT
from mae_search.mae.targets import PCATarget, Target, make_target, target_dim
from mae_search.training.checkpoint import load_checkpoint, save_checkpoint
from mae_search.training.evaluate import evaluate, finetune_metrics, has_labels, reconstruct, save_reconstruction_grid
from mae_search.training.schedule import lr_at

EpochCallback = Callable[[int, dict[str, float], "Trainer"], None]
# Unweighted loss terms are measured (for logging) on one step in this many.
MEASURE_EVERY = 8
# The PCA basis's sample of training images is drawn as the images of this epoch, one no run reaches.
PCA_SAMPLE_EPOCH = 2**31 - 1


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases, tokens and position embeddings (1-D or token params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one kernel for all parameters instead of a loop over them).

    Fused AdamW exists for CUDA and CPU in torch >= 2.4; on the tiny model's 84
    parameter tensors it cuts the optimiser step about 3.5x on CPU.
    """
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


class Trainer:
    """Owns model, optimiser, data and schedule position for one run on one worker."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        data: DataSplits | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = device or resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = MaskedAutoencoderViT(cfg.model, target_dim(cfg.loss, cfg.model)).to(self.device)
        self.wrap_model = wrap_model
        self.train_model: nn.Module = wrap_model(self.model) if wrap_model else self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        data = data or load_data(cfg.data, cfg.model, seed=cfg.seed)
        self.data = dataclasses.replace(data, pretrain=data.pretrain.to(self.device))
        self.target = self.make_target()
        self.steps_per_epoch = len(data.pretrain) // world_size // cfg.batch_size // cfg.optim.accum_iter
        effective_batch = cfg.batch_size * world_size * cfg.optim.accum_iter
        self.base_lr = cfg.optim.blr * effective_batch / 256
        self.optimizer = make_optimizer(self.model, self.base_lr, cfg.optim.betas, cfg.optim.weight_decay)
        self.epoch = 0  # next epoch to run
        self.step = 0  # optimisation steps taken
        self.history: list[dict[str, float]] = []
        self.step_log: list[dict[str, float]] = []  # per optimisation step: mask ratio and lr in force

    def make_target(self, fitted: dict[str, torch.Tensor] | None = None) -> Target:
        """The reconstruction target; a PCA basis is ``fitted`` (from a checkpoint) or fitted now on a sample
        of this run's training patches, drawn from the seed alone (every rank draws the same sample)."""
        loss, model = self.cfg.loss, self.cfg.model
        if loss.target == "pca" and fitted is None:
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + 7)
            per_image = (model.img_size // model.patch_size) ** 2
            count = min(len(self.data.pretrain), -(-loss.pca_patches // per_image))
            [(images_u8, _, uniforms)] = self.data.pretrain.shuffled(count, 1, gen, self.cfg.seed,
                                                                      PCA_SAMPLE_EPOCH, self.device, 0, 1)
            imgs = augment(images_u8, uniforms, self.cfg.data.augment, self.cfg.data.crop_scale, self.cfg.data.hflip)
            return PCATarget.fit(imgs, model.patch_size, loss.pca_components, loss.pca_patches, gen)
        pca = None if fitted is None else (fitted["mean"].to(self.device), fitted["basis"].to(self.device))
        return make_target(loss.target, model.patch_size, model.in_chans, hog_cells=loss.hog_cells,
                           hog_bins=loss.hog_bins, pca=pca)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "target": self.target.state_dict(),  # a PCA basis: the run's own, kept with it
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("target"):
            self.target = self.make_target(state["target"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state.get("history", []))

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.state_dict())

    def resume(self, path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(path, self.cfg))

    # ------------------------------------------------------------------ loop

    @property
    def use_amp(self) -> bool:
        return self.cfg.amp and self.device.type == "cuda"

    def mask_ratio_at(self, epoch_progress: float) -> float:
        return scheduled_mask_ratio(self.cfg.masking, epoch_progress)

    def train_step(self, imgs: torch.Tensor, ratio: float, measure: bool, update: bool) -> torch.Tensor:
        """Forward/backward on one augmented batch (and the optimiser step when ``update``).

        Returns [total, mse, freq, unif] as a device tensor (NaN for unmeasured
        terms) so the loop never waits on the device for a Python float.
        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out = self.train_model(imgs, ratio, self.cfg.masking.strategy)
            terms = mae_loss(imgs, out.pred, out.mask, out.latent, self.cfg.loss, self.target,
                             measure_unweighted=measure)
        (terms.total / self.cfg.optim.accum_iter).backward()
        if update:
            if self.cfg.optim.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        nan = terms.total.new_full((), float("nan")).detach()
        return torch.stack([terms.total.detach(), terms.mse.detach(),
                            nan if terms.freq is None else terms.freq, nan if terms.unif is None else terms.unif])

    def epoch_inputs(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (uint8 images, crop/flip uniforms) per step of the epoch, on the device
        (in memory or streamed: their ``shuffled`` method)."""
        cfg = self.cfg
        steps = self.steps_per_epoch * cfg.optim.accum_iter
        batches = self.data.pretrain.shuffled(cfg.batch_size, steps, gen, cfg.seed, self.epoch,
                                   self.device, self.rank, self.world_size)
        return ((images, uniforms) for images, _, uniforms in batches)

    def train_one_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.train_model.train()
        torch.manual_seed(cfg.seed * 100_003 + self.epoch * 1_009 + self.rank)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + self.epoch)
        batches = self.epoch_inputs(gen)
        steps = self.steps_per_epoch * cfg.optim.accum_iter
        total_steps = cfg.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        per_step = []
        ratio_sum = 0.0
        start = time.perf_counter()
        for i, (images_u8, uniforms) in enumerate(batches):
            ratio = self.mask_ratio_at(self.epoch + i / steps)
            ratio_sum += ratio
            if i % cfg.optim.accum_iter == 0:
                lr = lr_at(self.step, self.base_lr, warmup, total_steps, cfg.optim.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            imgs = augment(images_u8, uniforms, cfg.data.augment, cfg.data.crop_scale, cfg.data.hflip)
            update = (i + 1) % cfg.optim.accum_iter == 0
            if update:
                self.step_log.append({"step": self.step, "epoch": self.epoch + i / steps,
                                      "mask_ratio": ratio, "lr": self.optimizer.param_groups[0]["lr"]})
            per_step.append(self.train_step(imgs, ratio, measure=i % MEASURE_EVERY == 0, update=update))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        total, mse, freq, unif = torch.stack(per_step).nanmean(dim=0).tolist()
        images = steps * cfg.batch_size * self.world_size
        return {
            "loss": total, "mse": mse, "freq_loss": freq, "unif_loss": unif,
            "mask_ratio": ratio_sum / steps,
            "mask_ratio_end": self.mask_ratio_at(self.epoch + 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": elapsed, "throughput_img_s": images / elapsed,
        }

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Every metric due now. Call on every rank: fine-tuning is DDP-aware; probe, k-NN and
        reconstruction run on rank 0 only (they are cheap, and rank 0 reports them). The last epoch
        of a prepared set is evaluated on its whole labelled splits (``data.final_eval``)."""
        metrics: dict[str, float] = {}
        train, targets = self.data.scored(final, self.cfg.eval.test_at == "every_eval")
        if self.rank == 0:
            metrics.update(evaluate(
                self.model, train, targets, self.cfg.eval,
                self.cfg.masking.mask_ratio, self.target, self.device, self.cfg.seed,
                strategy=self.cfg.masking.strategy,
            ))  # reconstruction at the target ratio, mid-curriculum too: comparable with a run without one
        if has_labels(train):
            metrics.update(finetune_metrics(
                self.model, train, targets, self.cfg.eval, final, self.device, self.cfg.seed,
                rank=self.rank, world_size=self.world_size, wrap_model=self.wrap_model, use_amp=self.use_amp,
            ))
        self.model.train()
        return metrics

    def save_reconstruction(self, path: str | Path) -> Path:
        """Reconstruction grid of the first test images under a fixed masking seed, at the target ratio."""
        n = self.cfg.eval.grid_images
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            images = self.data.test.images[:n].to(self.device)
            rec = reconstruct(self.model, images, self.cfg.masking.mask_ratio, self.target,
                              self.cfg.masking.strategy)
        self.model.train()
        # A HOG target has no pixels: the grid shows the images and their masks only.
        recon = rec.get("recon_true_stats", rec["original"] * (1 - rec["mask_px"]) + 0.5 * rec["mask_px"])
        return save_reconstruction_grid(rec["original"], recon, rec["mask_px"], path)

    def fit(self, on_epoch_end: EpochCallback | None = None) -> list[dict[str, float]]:
        """Run the remaining epochs; returns the full per-epoch history (including resumed epochs)."""
        while self.epoch < self.cfg.epochs:
            metrics = self.train_one_epoch()
            self.epoch += 1
            last = self.epoch == self.cfg.epochs
            if last or self.epoch % self.cfg.eval.every_epochs == 0:
                metrics.update(self.evaluate(final=last))
            metrics["epoch"] = self.epoch
            self.history.append(metrics)
            if on_epoch_end:
                on_epoch_end(self.epoch, metrics, self)
        return self.history
