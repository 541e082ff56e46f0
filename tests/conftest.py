"""Shared fixtures: a very small config so unit tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from mae_search.config import TrainConfig

torch.set_num_threads(2)


def micro_config(**overrides) -> TrainConfig:
    base = TrainConfig.from_dict(
        {
            "model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                      "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
            "data": {"num_train": 128, "num_test": 64},
            "eval": {"probe_epochs": 2, "grid_images": 4},
            "optim": {"blr": 5e-3, "warmup_epochs": 0.5},
            "epochs": 2,
            "batch_size": 32,
        }
    )
    return base.with_overrides(overrides) if overrides else base


@pytest.fixture
def micro_cfg() -> TrainConfig:
    return micro_config()
