import torch

from mae_search.config import LossConfig
from mae_search.mae.losses import mae_loss, masked_laplacian_l1, masked_mse, patch_targets, uniformity
from mae_search.mae.masking import patchify
from mae_search.mae.targets import PixelTarget


def _setup(b=2, size=16, p=4):
    imgs = torch.randn(b, 3, size, size)
    n = (size // p) ** 2
    mask = torch.zeros(b, n)
    mask[:, : n // 2] = 1
    return imgs, mask, p


def test_mse_ignores_visible_patches():
    imgs, mask, p = _setup()
    target = patch_targets(imgs, p, norm_pix=True)
    pred = torch.randn_like(target)
    base = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # wreck every visible patch
    assert torch.equal(masked_mse(changed, target, mask), base)
    changed[mask == 1] += 1.0  # but a masked patch does count
    assert masked_mse(changed, target, mask) != base


def test_mse_zero_for_perfect_masked_prediction():
    imgs, mask, p = _setup()
    target = patch_targets(imgs, p, norm_pix=False)
    pred = target.clone()
    pred[mask == 0] = 0.0
    assert masked_mse(pred, target, mask) == 0


def test_norm_pix_targets_are_standardised_per_patch():
    imgs, _, p = _setup()
    t = patch_targets(imgs * 5 + 3, p, norm_pix=True)
    assert torch.allclose(t.mean(-1), torch.zeros(t.shape[:2]), atol=1e-5)
    assert torch.allclose(patch_targets(imgs, p, norm_pix=False), patchify(imgs, p))


def test_laplacian_loss_zero_when_perfect_and_blind_to_visible_pixels():
    imgs, mask, p = _setup()
    target = patch_targets(imgs, p, norm_pix=False)
    assert masked_laplacian_l1(target, target, mask, p, 3) == 0
    pred = target + 0.1 * torch.randn_like(target)
    base = masked_laplacian_l1(pred, target, mask, p, 3)
    assert base > 0
    # A visible patch far (>1 px) from any masked pixel cannot leak through the 3x3 kernel:
    # with a 4x4 grid and the first two patch-rows masked, the last row is two patches away.
    changed = pred.clone()
    changed[:, 12:16] += 50.0
    assert torch.allclose(masked_laplacian_l1(changed, target, mask, p, 3), base)


def test_uniformity_lower_for_spread_than_collapsed_features():
    spread = torch.randn(64, 5, 16)
    collapsed = torch.ones(64, 5, 16) + 0.01 * torch.randn(64, 5, 16)
    assert uniformity(spread) < uniformity(collapsed)
    assert uniformity(collapsed) > -0.05  # log(1) = 0 for identical features


NORM_PIX = PixelTarget(4, 3, norm=True)  # the patch size of _setup


def test_total_combines_weighted_terms_and_reports_each():
    imgs, mask, p = _setup()
    pred = torch.randn(2, 16, 48, requires_grad=True)
    latent = torch.randn(2, 9, 32, requires_grad=True)
    plain = mae_loss(imgs, pred, mask, latent, LossConfig(), NORM_PIX)
    assert torch.equal(plain.total, plain.mse)
    both = mae_loss(imgs, pred, mask, latent, LossConfig(freq_weight=0.05, unif_weight=0.01), NORM_PIX)
    assert torch.allclose(both.total, both.mse + 0.05 * both.freq + 0.01 * both.unif)
    both.total.backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_unweighted_terms_only_measured_when_asked():
    imgs, mask, p = _setup()
    pred, latent = torch.randn(2, 16, 48), torch.randn(2, 9, 32)
    skipped = mae_loss(imgs, pred, mask, latent, LossConfig(), NORM_PIX, measure_unweighted=False)
    assert skipped.freq is None and skipped.unif is None
    weighted = mae_loss(imgs, pred, mask, latent, LossConfig(freq_weight=0.1), NORM_PIX, measure_unweighted=False)
    assert weighted.freq is not None and weighted.unif is None
    measured = mae_loss(imgs, pred, mask, latent, LossConfig(), NORM_PIX, measure_unweighted=True)
    assert torch.equal(measured.total, skipped.total)


def test_loss_terms_are_computed_in_fp32_under_bf16_autocast():
    """The Laplacian's convolution would run in bf16 under autocast: the terms must not move with it."""
    imgs, mask, p = _setup()
    gen = torch.Generator().manual_seed(0)
    pred, latent = torch.randn(2, 16, 48, generator=gen), torch.randn(2, 9, 32, generator=gen)
    cfg = LossConfig(freq_weight=0.05, unif_weight=0.01)
    fp32 = mae_loss(imgs, pred, mask, latent, cfg, NORM_PIX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mae_loss(imgs, pred, mask, latent, cfg, NORM_PIX)
    for a, b in ((fp32.total, mixed.total), (fp32.freq, mixed.freq), (fp32.unif, mixed.unif)):
        assert b.dtype == torch.float32 and torch.equal(a, b)
