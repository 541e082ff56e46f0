"""The reconstruction targets of the paper's Table 1d: pixel, norm_pix, PCA and HOG."""

import pytest
import torch

from mae_search.config import ConfigError, LossConfig, TrainConfig
from mae_search.mae.losses import mae_loss, masked_mse
from mae_search.mae.masking import patchify, unpatchify
from mae_search.mae.targets import HOGTarget, PCATarget, PixelTarget, cell_histograms
from mae_search.training.checkpoint import CheckpointError
from mae_search.training.train import Trainer
from tests.conftest import micro_config


def images(seed: int = 0, b: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pixel_and_norm_pix_are_the_patches_and_the_per_patch_normalised_patches():
    imgs = images()
    patches = imgs.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)  # row-major, (p, p, C)
    assert torch.equal(PixelTarget(4, 3, norm=False)(imgs), patches)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    assert torch.allclose(PixelTarget(4, 3, norm=True)(imgs), (patches - mean) / (var + 1e-6).sqrt())
    # The loss is the masked MSE on them: the objective of every earlier run.
    pred, mask = torch.randn(2, 16, 48), (torch.arange(16) % 3 == 0).float().expand(2, 16)
    terms = mae_loss(imgs, pred, mask, torch.randn(2, 5, 8), LossConfig(), PixelTarget(4, 3, norm=True))
    assert torch.allclose(terms.mse, masked_mse(pred, (patches - mean) / (var + 1e-6).sqrt(), mask))


def planted_low_rank(variances: list[float], noise: float, n: int = 4000, p: int = 4) -> tuple[torch.Tensor, ...]:
    """Images whose 4 x 4 x 3 patches are mean + coefficients @ an orthonormal basis + white noise."""
    gen = torch.Generator().manual_seed(1)
    dim = p * p * 3
    basis, _ = torch.linalg.qr(torch.randn(dim, len(variances), generator=gen, dtype=torch.float64))
    coeffs = torch.randn(n, len(variances), generator=gen, dtype=torch.float64) * torch.tensor(variances).sqrt()
    mean = torch.linspace(-1, 1, dim, dtype=torch.float64)
    patches = mean + coeffs @ basis.T + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    imgs = unpatchify(patches.reshape(n // 16, 16, dim), p, 3)
    return imgs.float(), basis.float(), mean.float()


def test_pca_recovers_a_planted_basis_and_leaves_the_expected_residual():
    variances, noise = [9.0, 4.0, 1.0, 0.25, 0.0625], 0.01
    imgs, basis, mean = planted_low_rank(variances, noise)
    for k in (5, 3):
        target = PCATarget.fit(imgs, 4, k, max_patches=4000, gen=torch.Generator().manual_seed(0))
        # Its components are the planted ones, in order of variance (up to a sample's small rotation).
        assert ((target.basis.T @ basis[:, :k]).abs().diagonal() > 0.99).all()
        coefficients = target(imgs)
        assert coefficients.shape == (len(imgs), 16, k)
        rebuilt, _ = target.pixels(coefficients, imgs, torch.ones(len(imgs), 16))
        residual = ((rebuilt - patchify(imgs, 4)) ** 2).mean().item()
        # Per value: the dropped components' variance plus the noise outside the kept directions.
        expected = (sum(variances[k:]) + noise**2 * (48 - k)) / 48
        assert residual == pytest.approx(expected, rel=0.1)


def test_hog_cells_match_scikit_image():
    """Each channel's cell histograms, as scikit-image's hog computes them (per-cell L1-normalised there)."""
    from skimage.feature import hog

    imgs = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = cell_histograms(imgs, 4, 9)[0]  # (C, bins, 4, 4)
    for c in range(3):
        ref = hog(imgs[0, c].numpy(), orientations=9, pixels_per_cell=(4, 4), cells_per_block=(1, 1),
                  block_norm="L1", feature_vector=False)[:, :, 0, 0, :]
        mine = ours[c].permute(1, 2, 0)
        assert torch.allclose(mine / (mine.sum(-1, keepdim=True) + 1e-5), torch.from_numpy(ref), atol=1e-6)
    # A vertical edge votes in the 0-degree bin only (a horizontal gradient), on the pixels beside it.
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    hist = cell_histograms(edge, 4, 9)[0, 0]
    assert hist[1:].abs().sum() == 0 and hist[0].sum() > 0


def test_hog_target_is_one_unit_vector_per_patch_of_each_channels_cells():
    target = HOGTarget(4, 3, cells=2, bins=9)
    out = target(images())
    assert out.shape == (2, 16, 3 * 9 * 2 * 2) and target.dim == 108
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 16))
    assert not target.has_pixels and target.as_images(out, images()) is None


@pytest.mark.parametrize("target", ["pixel", "pca", "hog"])
def test_a_run_trains_on_each_target_and_says_what_it_measures(target, tmp_path):
    extra = {"loss.pca_components": 12} if target == "pca" else {}
    trainer = Trainer(micro_config(**{"loss.target": target, "epochs": 1, "eval.finetune.at": "never", **extra}))
    [metrics] = trainer.fit()
    assert trainer.model.decoder_pred.out_features == {"pixel": 48, "pca": 12, "hog": 108}[target]
    assert metrics["test_mse"] > 0 and metrics["linear_probe_acc"] >= 0
    # Pixels (PSNR, the Laplacian term, a reconstruction) exist for the targets that have them.
    assert ("psnr" in metrics) == (target != "hog")
    assert (metrics["freq_loss"] == metrics["freq_loss"]) == (target != "hog")  # NaN: not measured
    assert trainer.save_reconstruction(tmp_path / "grid.png").is_file()


def test_the_pca_basis_is_kept_with_the_run_and_restored_on_resume(tmp_path):
    cfg = micro_config(**{"loss.target": "pca", "loss.pca_components": 12, "eval.finetune.at": "never"})
    first = Trainer(cfg)
    first.train_one_epoch()
    first.epoch += 1
    first.save(tmp_path / "ckpt")
    again = Trainer(cfg.with_overrides({"seed": 5}))  # another seed fits another basis ...
    assert not torch.allclose(again.target.basis, first.target.basis)
    again.resume(tmp_path / "ckpt")  # ... until the run's own comes back with its weights
    assert torch.equal(again.target.basis, first.target.basis) and torch.equal(again.target.mean, first.target.mean)
    with pytest.raises(CheckpointError, match="trained for loss.target pca .* the config has norm_pix"):
        Trainer(micro_config()).resume(tmp_path / "ckpt")


def test_norm_pix_loss_is_read_as_its_new_name():
    assert TrainConfig.from_dict({"loss": {"norm_pix_loss": False}}).loss.target == "pixel"
    assert micro_config().with_overrides({"loss.norm_pix_loss": False}).loss.target == "pixel"  # --set
    pixel = micro_config(**{"loss.target": "pixel"})
    assert pixel.with_overrides({"loss.norm_pix_loss": True}).loss.target == "norm_pix"
    with pytest.raises(ConfigError, match="norm_pix_loss false contradicts target hog"):
        TrainConfig.from_dict({"loss": {"norm_pix_loss": False, "target": "hog"}})


@pytest.mark.parametrize(("loss", "message"), [
    ({"target": "pca", "pca_components": 96}, "loss.pca_components 96 exceeds the 48 values of a 4 x 4 x 3 patch"),
    ({"target": "hog", "hog_cells": 3}, "loss.hog_cells 3 does not divide model.patch_size 4"),
    ({"target": "hog", "freq_weight": 0.1}, "loss.freq_weight > 0 needs a pixel reconstruction"),
])
def test_a_target_the_geometry_cannot_hold_is_one_line(loss, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"model": {"patch_size": 4}, "loss": loss})
