"""A trial's data: the configured source read at the model's image size, its labelled budget applied.

The per-format rules (detection, checks, readers) are :mod:`mae_search.data.sources`;
this module is what the training code and the search's pre-flight call.
"""

from __future__ import annotations

import torch

from mae_search.config import DataConfig, ModelConfig
from mae_search.data.memory import DataError, ImageSet
from mae_search.data.sources import SOURCES
from mae_search.data.stream import DataSplits

__all__ = ["DataError", "DataSplits", "check_local_data", "load_data"]


def check_local_data(cfg: DataConfig) -> None:
    """Before a local search starts Ray: the data set is there and readable, so a typo or a damaged file
    fails in seconds with one line naming it, not in every trial after Ray started."""
    SOURCES[cfg.dataset].check(cfg)


def load_data(cfg: DataConfig, model: ModelConfig, seed: int = 0) -> DataSplits:
    """Load the configured data set at the model's image size; the labelled split cut to ``num_labelled``."""
    splits = SOURCES[cfg.dataset].load(cfg, model.img_size, seed)
    if cfg.num_labelled is not None:
        splits.full_train = None  # an explicit labelled budget holds at every epoch, the last included
        if cfg.num_labelled < len(splits.train):
            # A fixed subset: the first images (every loader keeps a fixed order), the same for every trial.
            t = splits.train
            splits.train = ImageSet(t.images[: cfg.num_labelled], t.labels[: cfg.num_labelled], t.classes)
    if splits.val is None:  # in memory: a random subset drawn from the seed
        splits.train, splits.val = draw_validation(splits.train, cfg.val_count(len(splits.train)), seed)
    if cfg.final_eval == "subset":
        splits.full_train = splits.full_test = None
    return splits


def draw_validation(labelled: ImageSet, count: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(the labelled images left to train the probe, k-NN and fine-tuning on, ``count`` validation images),
    drawn without overlap by a permutation from ``seed``: each seed its own split, the same on a rerun."""
    order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(VAL_SEED + seed))
    keep, val = order[count:].sort().values, order[:count].sort().values
    return (ImageSet(labelled.images[keep], labelled.labels[keep], labelled.classes),
            ImageSet(labelled.images[val], labelled.labels[val], labelled.classes))


VAL_SEED = 7_919_000  # the validation draw's stream, apart from the seed's other draws
