"""The one registry of what a trial reports: name, label, unit, direction, and where it comes from.

Validation (which metrics a space may optimise), the results table and MLflow
(which keys are metrics), and the report (labels, units, digits, columns)
all read this list, so a new metric is one line here plus the code that
computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["train", "eval", "finetune", "partial_finetune", "time"]


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # column header, unit included
    mode: Literal["max", "min"]  # which direction is better
    source: Source  # train: every epoch; eval: evaluation epochs; (partial_)finetune: when that variant runs
    scale: float = 1.0  # stored value x scale = shown value (fractions are shown in %)
    digits: int = 3
    in_tables: bool = True  # a column of the report's ablation tables
    short: str = ""  # the protocol's abbreviation, for one-line summaries (the reference rows' line)

    @property
    def higher_is_better(self) -> bool:
        return self.mode == "max"


REGISTRY: tuple[Metric, ...] = (
    Metric("linear_probe_acc", "LP top-1 (%)", "max", "eval", 100.0, 1, short="LP"),
    Metric("finetune_acc", "FT top-1 (%)", "max", "finetune", 100.0, 1, short="FT"),
    Metric("partial_finetune_acc", "partial FT top-1 (%)", "max", "partial_finetune", 100.0, 1),
    Metric("knn_acc", "k-NN top-1 (%)", "max", "eval", 100.0, 1, short="k-NN"),
    Metric("test_mse", "held-out masked MSE", "min", "eval", 1.0, 4),
    Metric("psnr", "PSNR (dB)", "max", "eval", 1.0, 2),
    Metric("psnr_true_stats", "PSNR, true patch stats (dB)", "max", "eval", 1.0, 2),
    Metric("masked_hf_error", "masked HF error, true patch stats", "min", "eval", 1.0, 4),
    Metric("loss", "train loss (last epoch)", "min", "train", 1.0, 4, in_tables=False),
    Metric("mse", "train masked MSE (last epoch)", "min", "train", 1.0, 4, in_tables=False),
    Metric("freq_loss", "train Laplacian L1 (last epoch)", "min", "train", 1.0, 4, in_tables=False),
    Metric("unif_loss", "train uniformity (last epoch)", "min", "train", 1.0, 4, in_tables=False),
    Metric("pretrain_time_s", "pretrain time (s)", "min", "time", 1.0, 1),
    Metric("finetune_time_s", "FT time (s)", "min", "finetune", 1.0, 1),
    Metric("partial_finetune_time_s", "partial FT time (s)", "min", "partial_finetune", 1.0, 1, in_tables=False),
    Metric("throughput_img_s", "img/s", "max", "train", 1.0, 0, in_tables=False),
    Metric("eval_train_images", "probe/k-NN train images", "max", "eval", 1.0, 0, in_tables=False),
    Metric("eval_test_images", "probe/k-NN test images", "max", "eval", 1.0, 0, in_tables=False),
)
VAL_PREFIX = "val_"
# What a search may select on is measured on the validation split (carved from the labelled training
# images) under these names; the plain names are the test split's, measured at a trial's last epoch only.
SELECTABLE = ("linear_probe_acc", "finetune_acc", "partial_finetune_acc", "knn_acc", "test_mse", "psnr",
              "psnr_true_stats", "masked_hf_error")


def val_name(name: str) -> str:
    """A test metric's name on the validation split: ``linear_probe_acc`` -> ``val_linear_probe_acc``."""
    return VAL_PREFIX + name


def test_name(name: str) -> str:
    """Back from :func:`val_name` (a name without the prefix is returned as it is)."""
    return name.removeprefix(VAL_PREFIX)


def _on_val(m: Metric) -> Metric:
    return Metric(val_name(m.name), f"val {m.label}", m.mode, m.source, m.scale, m.digits,
                  m.in_tables and m.name.endswith("_acc"), f"val {m.short}" if m.short else "")


REGISTRY = REGISTRY + tuple(_on_val(m) for m in REGISTRY if m.name in SELECTABLE) + (
    Metric("eval_val_images", "probe/k-NN val images", "max", "eval", 1.0, 0, in_tables=False),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def metric(name: str) -> Metric:
    """The registered metric, or a plain one (label = name) for a key the registry does not know."""
    return BY_NAME.get(name, Metric(name, name, "max", "train"))


SYSTEM_KEYS = frozenset({"throughput_img_s", "restored_from_epoch", "epoch_time_s", "trial_time_s", "seeds"})


def mlflow_key(name: str) -> str:
    """The MLflow name of a reported value, grouped by what it is (the UI shows one section per prefix):
    ``eval/`` what the protocols measure, ``train/`` the optimisation, ``system/`` times and throughput."""
    known = BY_NAME.get(name)
    if name in SYSTEM_KEYS or name.endswith("_time_s"):
        group = "system"
    elif known is not None and known.source in ("eval", "finetune", "partial_finetune"):
        group = "eval"
    else:
        group = "train"
    return f"{group}/{name}"


def from_mlflow_key(key: str) -> str:
    """Back from :func:`mlflow_key` (a key without a group is returned as it is)."""
    return key.split("/", 1)[1] if key.split("/", 1)[0] in ("eval", "train", "system") else key
