import pytest
import torch

from mae_search.config import MaskingConfig
from mae_search.mae.masking import num_kept, patchify, random_masking, scheduled_mask_ratio, unpatchify


def test_patchify_roundtrip():
    imgs = torch.randn(3, 3, 16, 16)
    patches = patchify(imgs, 4)
    assert patches.shape == (3, 16, 48)
    assert torch.equal(unpatchify(patches, 4, 3), imgs)


def test_patchify_puts_each_patch_in_its_own_row():
    imgs = torch.zeros(1, 1, 8, 8)
    imgs[0, 0, 4:8, 0:4] = 1.0  # bottom-left patch of a 2x2 grid
    patches = patchify(imgs, 4)
    assert patches[0].sum(dim=1).tolist() == [0.0, 0.0, 16.0, 0.0]


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75, 0.9])
def test_masking_keeps_exact_count_and_restores_order(ratio):
    b, n, d = 4, 64, 8
    x = torch.arange(b * n, dtype=torch.float32).reshape(b, n, 1).expand(b, n, d).contiguous()
    visible, mask, ids_restore = random_masking(x, ratio)
    keep = int(n * (1 - ratio))  # the official code's count
    assert visible.shape == (b, keep, d)
    assert (mask.sum(dim=1) == n - keep).all()
    # Visible tokens are exactly the unmasked positions of each sample.
    for i in range(b):
        kept_ids = visible[i, :, 0].long() - i * n
        assert set(kept_ids.tolist()) == set((mask[i] == 0).nonzero().flatten().tolist())
    # ids_restore undoes the shuffle: [visible; masked] gathered back is the original sequence.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, d))
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(restored, x)
    assert torch.equal(shuffled[:, :keep], visible)


def test_masking_is_per_sample():
    _, mask, _ = random_masking(torch.randn(8, 64, 4), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) > 1


def test_num_kept_never_zero():
    assert num_kept(4, 0.99) == 1


@pytest.mark.parametrize(("n", "ratio", "kept"), [(196, 0.9, 19), (196, 0.75, 49), (64, 0.85, 9), (49, 0.6, 19)])
def test_visible_count_truncates_as_the_official_code(n, ratio, kept):
    """int(N * (1 - ratio)): rounding would keep one token more at 0.9, 0.85 and 0.6."""
    assert num_kept(n, ratio) == kept == int(n * (1 - ratio))
    visible, mask, _ = random_masking(torch.zeros(2, n, 3), ratio)
    assert visible.shape[1] == kept and (mask.sum(1) == n - kept).all()


def test_curriculum_endpoints_and_shapes():
    lin = MaskingConfig(mask_ratio=0.75, curriculum=True, start_ratio=0.5, schedule="linear", ramp_epochs=5)
    cos = lin.model_copy(update={"schedule": "cosine"})
    for cfg in (lin, cos):
        assert scheduled_mask_ratio(cfg, 0) == pytest.approx(0.5)
        assert scheduled_mask_ratio(cfg, 5) == pytest.approx(0.75)
        assert scheduled_mask_ratio(cfg, 50) == pytest.approx(0.75)
        assert scheduled_mask_ratio(cfg, 2.5) == pytest.approx(0.625)
    # Cosine starts slower than linear.
    assert scheduled_mask_ratio(cos, 1) < scheduled_mask_ratio(lin, 1)
    const = lin.model_copy(update={"schedule": "constant"})
    assert scheduled_mask_ratio(const, 0) == 0.75
    off = lin.model_copy(update={"curriculum": False})
    assert scheduled_mask_ratio(off, 0) == 0.75


def test_curriculum_start_as_a_fraction_of_the_target():
    cfg = MaskingConfig(mask_ratio=0.8, curriculum=True, start_fraction=0.5, schedule="linear", ramp_epochs=4)
    assert scheduled_mask_ratio(cfg, 0) == pytest.approx(0.4)
    assert scheduled_mask_ratio(cfg, 2) == pytest.approx(0.6)
    assert scheduled_mask_ratio(cfg, 4) == pytest.approx(0.8)
