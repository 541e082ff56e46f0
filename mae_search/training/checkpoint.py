"""Checkpoints: one file holding everything needed to continue a run on the same curve.

Randomness is derived from (seed, epoch, rank) at the start of every epoch, so
the seed and the next epoch index *are* the RNG state; a resumed run draws the
same masks and crops as the uninterrupted one. bf16 autocast needs no loss
scaler, so there is none to save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mae_search.config import LossConfig, TrainConfig
from mae_search.mae.targets import target_dim
from mae_search.storage import Location

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
KEEP_CHECKPOINTS = 2  # per seed run: the latest, and the one before it in case the latest is damaged


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, worded as one line naming the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path | Location, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Read a checkpoint (a local path or an object-store URI, the file or its directory) and check it
    fits ``cfg``'s model; raise CheckpointError otherwise."""
    path = Location.of(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only: the state holds only tensors and plain data, so nothing in the file can run code
        # (checkpoints come from shared storage, and --resume takes any path).
        source = path.local_path if path.is_local else path.open_input()
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or hostile file
        raise CheckpointError(f"{path}: corrupt, unreadable or unsafe checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a mae-search checkpoint (format version {FORMAT_VERSION} expected)")
    if cfg is not None:
        saved = state["config"]["model"]
        wanted = cfg.model.model_dump()
        diff = sorted(k for k in wanted if k != "preset" and saved.get(k) != wanted[k])
        if diff:
            details = ", ".join(f"{k}={saved.get(k)} (config has {wanted[k]})" for k in diff)
            raise CheckpointError(f"{path}: model does not match the config: {details}")
        saved_loss = LossConfig.model_validate(state["config"].get("loss", {}))
        if target_dim(saved_loss, cfg.model) != target_dim(cfg.loss, cfg.model) or saved_loss.target != cfg.loss.target:
            raise CheckpointError(f"{path}: trained for loss.target {saved_loss.target} (its decoder predicts "
                                  f"{target_dim(saved_loss, cfg.model)} values a patch); the config has "
                                  f"{cfg.loss.target} ({target_dim(cfg.loss, cfg.model)})")
    return state
