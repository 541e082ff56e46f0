"""Typed configuration for one MAE pre-training run.

Every knob a search can turn lives here, validated by pydantic with unknown keys
forbidden, so a typo in a YAML file fails loudly instead of silently training
the default. ``TrainConfig.with_overrides`` applies dotted keys
(``"model.decoder_depth": 2``) -- the form search dimensions use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mae_search.parsing import (
    ConfigError,
    Epochs,
    StrictModel,
    describe_validation_error,
    read_text,
    read_yaml,
    set_dotted,
)


class _Strict(StrictModel):
    model_config = ConfigDict(validate_assignment=True)


class ModelConfig(_Strict):
    """Encoder/decoder geometry. Defaults are the tiny CPU preset; ``preset: vit-b16`` (see PRESETS)
    sets the whole geometry, and keys given beside it override the preset's."""

    preset: str | None = None
    img_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    in_chans: int = Field(3, ge=1)
    embed_dim: int = Field(96, ge=8)
    depth: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    decoder_embed_dim: int = Field(64, ge=8)
    decoder_depth: int = Field(2, ge=1)
    decoder_num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    encoder_mask_token: bool = Field(
        False, description="paper Table 1c 'w/ [M]': the encoder runs on every token, a learned mask token in "
        "each removed position (about 3.3x the encoder's FLOPs at 75 %); the decoder takes its whole sequence")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
            data = {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for key in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, key) % 4:
                raise ValueError(f"{key} {getattr(self, key)} is not divisible by 4 (2D sin-cos position embeddings)")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


class MaskingConfig(_Strict):
    """Target mask ratio and the optional curriculum that ramps up to it."""

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    curriculum: bool = False
    start_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    start_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="the start as a fraction of mask_ratio; when set it replaces start_ratio. A "
                                          "joint search samples this, so the start never exceeds the sampled target")
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    ramp_epochs: float = Field(5.0, ge=0.0)
    strategy: Literal["random", "block", "grid"] = Field(
        "random", description="mask sampling (paper Table 1f): random patches, random rectangles (BEiT's "
        "block-wise), or one patch kept of every 2 x 2 (grid: ratio 0.75 only)")

    @model_validator(mode="after")
    def _ramps_up(self) -> MaskingConfig:
        if self.strategy == "grid" and (self.mask_ratio != 0.75 or self.curriculum):
            raise ValueError(f"strategy grid keeps one patch of every 2 x 2, a fixed ratio of 0.75: mask_ratio "
                             f"{self.mask_ratio:g}{' with a curriculum' if self.curriculum else ''} cannot be grid "
                             "sampled (block and random follow any ratio, and a curriculum's ramp)")
        if self.curriculum and self.start > self.mask_ratio:
            raise ValueError(f"start_ratio {self.start_ratio:g} exceeds mask_ratio {self.mask_ratio:g}: a "
                             "curriculum ramps the ratio up to its target (search start_fraction to keep the start "
                             "below every target)")
        return self

    @property
    def start(self) -> float:
        """The curriculum's first mask ratio."""
        return self.start_ratio if self.start_fraction is None else self.start_fraction * self.mask_ratio


class LossConfig(_Strict):
    """MAE objective: masked MSE on the reconstruction target plus the two optional research terms.

    ``target`` is the paper's Table 1d (mae_search/mae/targets.py says what each is). The older
    ``norm_pix_loss: true/false`` is read as ``target: norm_pix/pixel``, so old space files and records
    still load.
    """

    target: Literal["pixel", "norm_pix", "pca", "hog"] = "norm_pix"
    pca_components: int = Field(96, ge=1, description="pca: principal components kept per patch (paper: 96 of "
                                "768 values at 16 x 16 x 3)")
    pca_patches: int = Field(20_000, ge=16, description="pca: training patches the basis is fitted on")
    hog_cells: int = Field(2, ge=1, description="hog: cells a patch side (MaskFeat: 2 cells of 8 pixels)")
    hog_bins: int = Field(9, ge=2, description="hog: orientation bins over 180 degrees")
    freq_weight: float = Field(0.0, ge=0.0)
    unif_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _read_norm_pix_loss(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "norm_pix_loss" not in data:
            return data
        data = dict(data)
        norm = data.pop("norm_pix_loss")
        if not isinstance(norm, bool):
            raise ValueError(f"norm_pix_loss {norm!r}: expected true or false (it is now loss.target: norm_pix "
                             "or pixel)")
        implied = "norm_pix" if norm else "pixel"
        if data.setdefault("target", implied) != implied:
            raise ValueError(f"norm_pix_loss {str(norm).lower()} contradicts target {data['target']}: give "
                             "loss.target alone (norm_pix_loss is its older name for norm_pix / pixel)")
        return data

    @property
    def norm_pix_loss(self) -> bool:
        """Whether the target is normalised per patch (the older name of ``target: norm_pix``)."""
        return self.target == "norm_pix"


class OptimConfig(_Strict):
    blr: float = Field(1.5e-4, gt=0.0, description="base lr; lr = blr * effective_batch / 256")
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    clip_grad: float | None = Field(5.0, gt=0.0)
    accum_iter: int = Field(1, ge=1)


class DataConfig(_Strict):
    """Where images come from. ``synthetic_shapes`` is generated, so it needs no path."""

    dataset: Literal["synthetic_shapes", "cifar10", "stl10", "imagefolder", "prepared"] = "synthetic_shapes"
    path: str | None = Field(None, description="the data set's directory; for 'prepared', its manifest (or the "
                             "directory `mae-search prepare` wrote)")
    num_train: int = Field(8000, ge=16, description="synthetic_shapes only")
    num_test: int = Field(1000, ge=16, description="synthetic_shapes only")
    num_labelled: int | None = Field(
        None, ge=10, description="labelled training images for probe, k-NN and fine-tuning (a fixed subset; None: all)"
    )
    val_split: float = Field(
        0.2, gt=0.0, description="the validation split a search selects on, carved from the labelled training "
        "images: a fraction (< 1) or a count (>= 1). Probe, k-NN and fine-tuning train on the rest; test is kept "
        "for the last epoch's numbers")
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    augment: Literal["none", "crop_fixed", "crop_rand", "crop_color"] = Field(
        "crop_rand", description="pre-training augmentation (paper Table 1e): none, a fixed-size random crop, "
        "random resized crop (crop_scale), or that plus colour jitter")
    eval_images: int = Field(10_000, ge=16, description="prepared only: labelled images of each of train and "
                             "val/test decoded into memory for probe, k-NN and fine-tuning (the first ones)")
    final_eval: Literal["full", "subset"] = Field(
        "full", description="prepared only: at the last epoch, probe, k-NN and fine-tuning stream every labelled "
        "image ('full'), or keep the eval_images subset ('subset'); reference rows follow the same choice")
    decode_workers: int = Field(2, ge=0, description="prepared only: decode processes per training worker "
                                "(0: decode on the training thread)")
    shuffle_shards: int = Field(4, ge=1, description="prepared only: shards each decode process holds and "
                                "shuffles together (the prefetch budget: memory is this x shard size)")

    @model_validator(mode="after")
    def _check_path(self) -> DataConfig:
        if self.dataset != "synthetic_shapes" and not self.path:
            raise ValueError(f"data.path is required for dataset '{self.dataset}'")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.val_split >= 1 and self.val_split != int(self.val_split):
            raise ValueError(f"val_split {self.val_split:g}: a fraction below 1 or a whole number of images")
        if self.num_labelled is not None and self.val_split >= self.num_labelled:
            raise ValueError(f"val_split {self.val_split:g} leaves none of num_labelled {self.num_labelled} "
                             "images to train the probe on")
        return self

    def val_count(self, labelled: int) -> int:
        """How many of ``labelled`` training images the validation split takes (at least 1, never all)."""
        count = round(self.val_split * labelled) if self.val_split < 1 else int(self.val_split)
        return min(max(count, 1), labelled - 1)


When = Literal["never", "end", "every_eval"]


class FinetuneConfig(_Strict):
    """Supervised fine-tuning of the pre-trained encoder (the paper's main metric; main_finetune.py's recipe).

    AdamW with layer-wise lr decay, warm-up then cosine, label smoothing, drop
    path, gradient clipping, global-average-pooled features into a linear head;
    mixup/cutmix optional. ``blocks``: train only the last k blocks (+ head),
    the paper's partial fine-tuning (Fig. 9); None trains every block.
    """

    at: When = "end"
    epochs: Epochs = Field(15)
    batch_size: int = Field(64, ge=2, description="per worker")
    blr: float = Field(2e-3, gt=0.0, description="lr = blr * effective_batch / 256")
    layer_decay: float = Field(0.75, gt=0.0, le=1.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(2.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    clip_grad: float | None = Field(5.0, gt=0.0)
    mixup: float = Field(0.0, ge=0.0, description="mixup alpha; 0 disables (the paper uses 0.8 at ImageNet scale)")
    cutmix: float = Field(0.0, ge=0.0, description="cutmix alpha; 0 disables (the paper uses 1.0)")
    crop_scale: tuple[float, float] = (0.35, 1.0)
    blocks: int | None = Field(None, ge=0, description="train only the last k blocks; None: all (full fine-tuning)")


class PartialFinetuneConfig(FinetuneConfig):
    """Partial fine-tuning (paper Fig. 9): the same recipe on the last ``blocks`` blocks only; off by default."""

    at: When = "never"
    blocks: int = Field(1, ge=0)
    epochs: Epochs = Field(10)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)


class ProbeConfig(_Strict):
    """Linear probe as the paper: frozen CLS token, BatchNorm without affine (eps 1e-6), linear head."""

    epochs: Epochs = Field(100, description="over the labelled split; small splits need more than ImageNet's 90")
    pool: Literal["cls", "mean"] = "cls"
    lr: float = Field(0.1, gt=0.0, description="SGD (momentum 0.9), cosine schedule, batch 256")


class ScratchConfig(_Strict):
    """How the random-init reference trains from scratch: the fine-tuning recipe with the paper's
    from-scratch changes (He et al. 2022, appendix A.2: the supervised ViT baseline uses no layer-wise
    lr decay and weight decay 0.3). Layer decay suits a pre-trained encoder, whose lower blocks hold
    general features worth keeping; on a random one it would starve the embeddings of learning (0.24x
    the lr on ``tiny``), inflating every MAE-vs-scratch margin. Epochs, lr, batch and augmentation stay
    the fine-tuning's, so both columns compare at one budget."""

    layer_decay: float = Field(1.0, gt=0.0, le=1.0)
    weight_decay: float = Field(0.3, ge=0.0)

    def recipe(self, finetune: FinetuneConfig) -> FinetuneConfig:
        """The fine-tuning config with the from-scratch settings in place."""
        return finetune.model_copy(update={"layer_decay": self.layer_decay, "weight_decay": self.weight_decay})


class EvalConfig(_Strict):
    """Evaluation cadence and protocol (README, "Evaluation", says what each metric does)."""

    every_epochs: int = Field(1, ge=1)
    test_at: Literal["end", "every_eval"] = Field(
        "end", description="when the test split is scored: at the last epoch only (nothing that selects sees "
        "it), or at every evaluation (a space with select_on: test sets this)")
    probe: ProbeConfig = ProbeConfig()
    knn_k: int = Field(20, ge=1)
    finetune: FinetuneConfig = FinetuneConfig()
    partial_finetune: PartialFinetuneConfig = PartialFinetuneConfig()
    scratch: ScratchConfig = ScratchConfig()
    grid_images: int = Field(8, ge=1)

    def from_scratch(self) -> EvalConfig:
        """This evaluation with both fine-tuning variants on the from-scratch recipe (the reference row)."""
        return self.model_copy(update={"finetune": self.scratch.recipe(self.finetune),
                                       "partial_finetune": self.scratch.recipe(self.partial_finetune)})

    @model_validator(mode="after")
    def _check_finetune(self) -> EvalConfig:
        for key in ("finetune", "partial_finetune"):
            ft: FinetuneConfig = getattr(self, key)
            lo, hi = ft.crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{key}.crop_scale must satisfy 0 < low <= high <= 1, got {ft.crop_scale}")
            if (ft.mixup > 0 or ft.cutmix > 0) and ft.batch_size % 2:
                raise ValueError(f"{key}.batch_size must be even with mixup/cutmix")
        return self


class TrainConfig(_Strict):
    """One pre-training run: everything needed to reproduce it."""

    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    epochs: Epochs = Field(10)
    batch_size: int = Field(128, ge=1, description="per worker")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast; only takes effect on a GPU")
    compile: bool = False

    @model_validator(mode="after")
    def _check_partial_blocks(self) -> TrainConfig:
        blocks = self.eval.partial_finetune.blocks
        if blocks is not None and blocks > self.model.depth:
            raise ValueError(f"eval.partial_finetune.blocks {blocks} exceeds model.depth {self.model.depth}")
        if self.data.dataset == "synthetic_shapes" and self.batch_size > self.data.num_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds data.num_train {self.data.num_train}: "
                             "an epoch would have no batch")
        self._check_target()
        side = self.model.img_size // self.model.patch_size
        if self.masking.strategy == "grid" and side % 2:
            raise ValueError(f"masking.strategy grid needs an even number of patches a side (2 x 2 groups); "
                             f"model.img_size {self.model.img_size} / patch_size {self.model.patch_size} gives {side}")
        return self

    def _check_target(self) -> None:
        """A target the patch geometry cannot hold, or a Laplacian term on a target without pixels."""
        loss, p, c = self.loss, self.model.patch_size, self.model.in_chans
        if loss.target == "pca" and loss.pca_components > p * p * c:
            raise ValueError(f"loss.pca_components {loss.pca_components} exceeds the {p * p * c} values of a "
                             f"{p} x {p} x {c} patch (the paper keeps 96 of 768)")
        if loss.target == "hog" and p % loss.hog_cells:
            raise ValueError(f"loss.hog_cells {loss.hog_cells} does not divide model.patch_size {p} (MaskFeat: "
                             "2 cells of 8 pixels a 16-pixel patch side)")
        if loss.target == "hog" and loss.freq_weight > 0:
            raise ValueError("loss.freq_weight > 0 needs a pixel reconstruction; loss.target hog predicts "
                             "gradient histograms, not pixels")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        raw = read_yaml(read_text(path), str(path)) or {}
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, source)) from None

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> TrainConfig:
        """Return a copy with dotted-key overrides applied and re-validated.

        A new ``model.preset`` replaces the whole geometry (then other ``model.*``
        overrides apply on top), so a preset can be a search dimension.
        """
        raw = self.model_dump()
        for dotted, value in sorted(overrides.items(), key=lambda kv: kv[0] != "model.preset"):
            if dotted == "model.preset":
                if value not in PRESETS:
                    raise ConfigError(f"{source}: model.preset: unknown model preset {value!r} "
                                      f"(known: {', '.join(PRESETS)})")
                raw["model"] = ModelConfig(preset=value).model_dump()
                continue
            dotted, value = current_name(dotted, value, source)
            set_dotted(raw, dotted, value, source)
        return TrainConfig.from_dict(raw, source=source)


# Older parameter names still read where a dotted name is given (--set, a variant's settings): the new name and
# how a value translates. A space file's dimension must use the new name (space.py says which).
RENAMED: dict[str, tuple[str, dict[Any, Any]]] = {
    "loss.norm_pix_loss": ("loss.target", {True: "norm_pix", False: "pixel"}),
}


def current_name(dotted: str, value: Any, source: str = "config") -> tuple[str, Any]:
    """``(dotted, value)`` under the parameter's current name (unchanged for a current one)."""
    if dotted not in RENAMED:
        return dotted, value
    new, values = RENAMED[dotted]
    if not isinstance(value, bool) or value not in values:
        raise ConfigError(f"{source}: {dotted} {value!r}: expected one of {', '.join(map(str, values))} (it is "
                          f"now {new})")
    return new, values[value]


def known_parameters(cfg: BaseModel | None = None, prefix: str = "") -> list[str]:
    """All dotted parameter names of a TrainConfig (for error messages and validation)."""
    cfg = cfg or TrainConfig()
    names: list[str] = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            names.extend(known_parameters(value, f"{prefix}{name}."))
        else:
            names.append(f"{prefix}{name}")
    return names


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny models for CPU runs on 32x32 images (the embedded data set).
    "tiny": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "small": dict(img_size=32, patch_size=4, embed_dim=192, depth=8, num_heads=6,
                  decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    # The improved-MAE STL-10 model (embed 192, depth 8, decoder 128x4) at 224 px.
    "stl10-vit-tiny": dict(img_size=224, patch_size=16, embed_dim=192, depth=8, num_heads=6,
                           decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    # The paper's encoders with its default decoder (512 wide, 8 deep, 16 heads).
    "vit-b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit-l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit-h14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return ModelConfig(preset=name, **overrides)
