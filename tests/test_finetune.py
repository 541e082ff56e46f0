"""Fine-tuning (full and partial) and the reference rows, on micro models in seconds."""

import pytest
import torch

from mae_search.config import FinetuneConfig, ModelConfig
from mae_search.data.load import load_data
from mae_search.data.memory import ImageSet
from mae_search.mae.model import MaskedAutoencoderViT, ViTClassifier, encoder_state_dict
from mae_search.training.evaluate import evaluate_reference
from mae_search.training.finetune import build_classifier, finetune, make_finetune_optimizer
from mae_search.training.train import Trainer
from tests.conftest import micro_config

MICRO = micro_config().model


def brightness_task(n: int, seed: int) -> ImageSet:
    """Two classes a classifier must learn: dark and bright images (noise on top)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 200.0, 50.0)
    images = (base + 30 * torch.randn(n, 3, 16, 16, generator=gen)).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, ("dark", "bright"))


def encoder(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return encoder_state_dict(MaskedAutoencoderViT(MICRO))


def test_classifier_loads_the_encoder_weights():
    weights = encoder()
    clf = ViTClassifier.from_encoder(weights, MICRO, num_classes=3)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])
    assert torch.equal(clf.patch_embed.weight, weights["patch_embed.weight"])
    assert clf(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="do not fit"):
        ViTClassifier.from_encoder(weights, MICRO.model_copy(update={"depth": 2}), num_classes=3)


def test_training_from_scratch_gets_no_layer_decay_while_fine_tuning_does(monkeypatch):
    """The random-init reference is trained from scratch: every block at the full lr and weight decay 0.3;
    a pre-trained encoder's fine-tuning keeps layer decay 0.75 and weight decay 0.05."""
    import mae_search.training.finetune as ft

    seen = []
    real = ft.make_finetune_optimizer

    def spy(model, lr, cfg):
        optimizer = real(model, lr, cfg)
        seen.append(sorted({(round(g["base_lr"] / lr, 6), g["weight_decay"]) for g in optimizer.param_groups}))
        return optimizer

    monkeypatch.setattr(ft, "make_finetune_optimizer", spy)
    cfg = micro_config(**{"model.depth": 2})
    data = load_data(cfg.data, cfg.model, seed=0)
    evaluate_reference("random_init", cfg.model, data.train, {"test": data.test}, cfg.eval, torch.device("cpu"), 0)
    Trainer(cfg).evaluate(final=True)
    scratch, finetuned = seen
    assert scratch == [(1.0, 0.0), (1.0, 0.3)]  # one lr for every block; decay 0.3 where any
    assert {scale for scale, _ in finetuned} == {0.75 ** 3, 0.75 ** 2, 0.75, 1.0}  # depth 2: embed, 2 blocks, head
    assert {wd for _, wd in finetuned} == {0.0, 0.05}


def test_layer_wise_lr_decay_scales_blocks_below_the_head():
    cfg = FinetuneConfig(layer_decay=0.5)
    model = build_classifier(encoder(), MICRO.model_copy(update={"depth": 1}), 3, cfg)
    optimizer = make_finetune_optimizer(model, lr=1.0, cfg=cfg)
    lr_of = {id(p): g["base_lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    # depth 1: embeddings are layer 0 (0.25), block 0 is layer 1 (0.5), head and fc_norm layer 2 (1.0).
    assert lr_of[id(names["patch_embed.weight"])] == pytest.approx(0.25)
    assert lr_of[id(names["blocks.0.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert lr_of[id(names["head.weight"])] == pytest.approx(1.0)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(names["cls_token"])] == 0 and decay[id(names["blocks.0.norm1.weight"])] == 0
    assert decay[id(names["blocks.0.mlp.fc1.weight"])] == cfg.weight_decay


def test_full_finetuning_learns_a_separable_task_and_is_deterministic():
    train, test = brightness_task(128, 0), brightness_task(64, 1)
    cfg = FinetuneConfig(epochs=4, batch_size=16, blr=2e-2, warmup_epochs=0.5)
    first = finetune(encoder(), MICRO, train, test, cfg, device=torch.device("cpu"), seed=3)
    again = finetune(encoder(), MICRO, train, test, cfg, device=torch.device("cpu"), seed=3)
    assert first.accuracy >= 0.95
    assert again.accuracy == first.accuracy and first.time_s > 0


def test_partial_finetuning_trains_only_the_last_blocks_and_the_head():
    cfg = FinetuneConfig(blocks=1, epochs=1, batch_size=16)
    deep = MICRO.model_copy(update={"depth": 2})
    torch.manual_seed(0)
    weights = encoder_state_dict(MaskedAutoencoderViT(deep))
    model = build_classifier(weights, deep, 2, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "fc_norm", "head")) for n in trainable)
    assert any(n.startswith("blocks.1.") for n in trainable)


def test_mixup_and_cutmix_follow_the_seed(monkeypatch):
    """timm's Mixup draws from numpy's global generator: the same seed gives the same weights and accuracy,
    another seed other ones, whatever that generator held before."""
    import numpy as np

    import mae_search.training.finetune as ft

    trained = []
    real_accuracy = ft.classifier_accuracy

    def keep_weights(model, *args, **kwargs):
        trained.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_accuracy(model, *args, **kwargs)

    monkeypatch.setattr(ft, "classifier_accuracy", keep_weights)
    train, test = brightness_task(64, 0), brightness_task(32, 1)
    cfg = FinetuneConfig(epochs=1, batch_size=16, mixup=0.8, cutmix=1.0)
    results = []
    for seed, numpy_state in ((0, 1), (0, 2), (1, 1)):
        np.random.seed(numpy_state)
        results.append(finetune(encoder(), MICRO, train, test, cfg, device=torch.device("cpu"), seed=seed))
    same = all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert same and results[0].accuracy == results[1].accuracy
    assert not all(torch.equal(trained[0][k], trained[2][k]) for k in trained[0])
    assert np.random.get_state()[1][0] == np.random.RandomState(1).get_state()[1][0]  # given back


def test_trainer_reports_finetuning_at_the_last_epoch_only():
    cfg = micro_config(**{"eval.partial_finetune.at": "every_eval", "eval.partial_finetune.epochs": 1})
    history = Trainer(cfg).fit()
    assert "finetune_acc" not in history[0] and "val_finetune_acc" not in history[0]
    assert "finetune_acc" in history[-1] and "val_finetune_acc" in history[-1]
    # Every evaluation scores the validation split; the test split only at the last epoch.
    assert all("val_partial_finetune_acc" in h and h["partial_finetune_time_s"] > 0 for h in history)
    assert ["partial_finetune_acc" in h for h in history] == [False] * (len(history) - 1) + [True]


def test_an_encoder_pretrained_with_mask_tokens_in_it_is_fine_tuned_without_them():
    """The "w/ [M]" encoder's mask token is pre-training only: the classifier takes every other weight
    (the tiny ablation's trials failed at their final fine-tuning when it was handed over)."""
    cfg = micro_config(**{"model.encoder_mask_token": True, "epochs": 1})
    trainer = Trainer(cfg)
    weights = encoder_state_dict(trainer.model)
    assert "encoder_mask_token" not in weights
    clf = ViTClassifier.from_encoder(weights, cfg.model, num_classes=2)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, trainer.model.blocks[0].attn.qkv.weight)
    history = trainer.fit()
    assert "finetune_acc" in history[-1] and "val_finetune_acc" in history[-1]


def test_reference_rows_use_the_trials_initialisation_and_raw_pixels():
    cfg = micro_config(seed=4)
    data = load_data(cfg.data, cfg.model, seed=cfg.seed)
    targets = {"val": data.val, "test": data.test}
    random_init = evaluate_reference("random_init", cfg.model, data.train, targets, cfg.eval,
                                     torch.device("cpu"), cfg.seed)
    # The model a trial of seed 4 starts from, through the same protocol, fine-tuned on the from-scratch
    # recipe (no layer decay, weight decay 0.3).
    scratch = {"eval.finetune.layer_decay": 1.0, "eval.finetune.weight_decay": 0.3}
    untrained = Trainer(cfg.with_overrides(scratch)).evaluate(final=True)
    for key in ("linear_probe_acc", "knn_acc", "finetune_acc"):
        assert random_init[key] == untrained[key], key
        assert random_init[f"val_{key}"] == untrained[f"val_{key}"], key
    pixels = evaluate_reference("raw_pixels", cfg.model, data.train, targets, cfg.eval, torch.device("cpu"), 4)
    assert set(pixels) == {"linear_probe_acc", "knn_acc", "val_linear_probe_acc", "val_knn_acc",
                           "eval_train_images", "eval_test_images", "eval_val_images"}
    assert (pixels["eval_train_images"], pixels["eval_val_images"], pixels["eval_test_images"]) == (
        len(data.train), len(data.val), len(data.test))
    with pytest.raises(ValueError, match="unknown reference"):
        evaluate_reference("imagenet", cfg.model, data.train, targets, cfg.eval, torch.device("cpu"), 4)


def test_width_that_cannot_make_sincos_embeddings_is_refused():
    from mae_search.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"embed_dim 30 is not divisible by 4") as exc:
        TrainConfig.from_dict({"model": {"embed_dim": 30, "num_heads": 2}})
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="partial_finetune.blocks 9 exceeds model.depth 4"):
        TrainConfig.from_dict({"eval": {"partial_finetune": {"blocks": 9}}})
    with pytest.raises(ValueError):
        ModelConfig(decoder_embed_dim=18, decoder_num_heads=2)
