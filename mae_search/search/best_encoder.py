"""The best trial's encoder, exported to MLflow at the end of a search, and loaded back.

Two forms: the encoder's weights with its configuration (``best_encoder/`` on the
parent run, ``encoder/`` on the trial's run), which :func:`load_encoder` turns back
into a :class:`~mae_search.mae.model.MaskedAutoencoderViT` for probing or
fine-tuning; and an MLflow model exported with ``torch.export``
(``runs:/<parent run>/encoder``), which loads without this project's code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from mae_search.config import TrainConfig
from mae_search.mae.model import PRETRAINING_ONLY, MAEEncoder, MaskedAutoencoderViT, encoder_state_dict
from mae_search.mae.targets import target_dim
from mae_search.search.tracking import TrackingError, client
from mae_search.storage import Location
from mae_search.training.checkpoint import CHECKPOINT_FILE, load_checkpoint


def log_best_encoder(mlflow_client: Any, parent_id: str, trial_run_id: str | None, checkpoint_dir: str) -> None:
    """The best trial's encoder weights + config (loadable with :func:`load_encoder`) on the parent run and
    the trial's run, and the encoder as an MLflow model on the parent run. Nothing without a checkpoint."""
    if not checkpoint_dir or not (Location.of(checkpoint_dir) / CHECKPOINT_FILE).is_file():
        return
    state = load_checkpoint(Location.of(checkpoint_dir) / CHECKPOINT_FILE)
    cfg = TrainConfig.model_validate(state["config"])
    model = MaskedAutoencoderViT(cfg.model, target_dim(cfg.loss, cfg.model))
    model.load_state_dict(state["model"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(encoder_state_dict(model), Path(tmp) / "encoder.pt")
        (Path(tmp) / "config.json").write_text(cfg.model_dump_json(indent=2))
        for name in ("encoder.pt", "config.json"):
            mlflow_client.log_artifact(parent_id, str(Path(tmp) / name), "best_encoder")
            if trial_run_id:
                mlflow_client.log_artifact(trial_run_id, str(Path(tmp) / name), "encoder")
    log_encoder_model(mlflow_client, parent_id, model, cfg)


def log_encoder_model(mlflow_client: Any, parent_id: str, model: MaskedAutoencoderViT, cfg: TrainConfig) -> None:
    """The encoder as an MLflow model (``runs:/<parent run>/encoder``): images in, tokens out, exported
    with torch.export, so ``mlflow.pytorch.load_model`` needs neither this project nor its code to load
    it. Saved locally and logged as the run's artifacts through the given client: no global MLflow state
    (``mlflow.set_tracking_uri`` would leak into the rest of the process)."""
    import mlflow.pytorch

    encoder = MAEEncoder(model).eval()
    example = torch.rand(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        # Requirements given, not inferred: inference re-imports everything in a subprocess (tens of s).
        mlflow.pytorch.save_model(encoder, Path(tmp) / "encoder", input_example=example.numpy(),
                                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        mlflow_client.log_artifacts(parent_id, str(Path(tmp) / "encoder"), "encoder")


def load_encoder(run_id: str, tracking_uri: str, artifact_path: str = "best_encoder"):
    """Load a logged encoder back into a MaskedAutoencoderViT (decoder freshly initialised).

    Use the search's parent run with ``best_encoder`` or a trial's run with
    ``encoder``; the result is ready for probing or fine-tuning.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client(tracking_uri).download_artifacts(run_id, artifact_path, tmp))
        cfg = TrainConfig.model_validate_json((local / "config.json").read_text())
        model = MaskedAutoencoderViT(cfg.model, target_dim(cfg.loss, cfg.model))
        missing, unexpected = model.load_state_dict(torch.load(local / "encoder.pt", map_location="cpu"),
                                                    strict=False)
    if unexpected or any(not k.startswith(PRETRAINING_ONLY) for k in missing):
        raise TrackingError(f"run {run_id}: encoder weights do not fit the logged config")
    return model, cfg
