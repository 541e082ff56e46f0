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


def _masked_neighbours(mask: torch.Tensor) -> float:
    """Mean number of masked 4-neighbours of a masked patch (contiguity of the removed region)."""
    b, n = mask.shape
    side = int(n**0.5)
    grid = mask.reshape(b, side, side).bool()
    padded = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return float(neighbours[grid].mean())


@pytest.mark.parametrize("strategy,ratio", [("random", 0.75), ("block", 0.4), ("block", 0.75), ("block", 0.9),
                                            ("grid", 0.75)])
def test_every_strategy_removes_the_official_count_and_restores_order(strategy, ratio):
    from mae_search.mae.masking import mask_patches

    torch.manual_seed(0)
    b, n, d = 16, 64, 4
    x = torch.arange(b * n, dtype=torch.float32).reshape(b, n, 1).expand(b, n, d).contiguous()
    visible, mask, ids_restore = mask_patches(x, ratio, strategy)
    keep = int(n * (1 - ratio))
    assert visible.shape == (b, keep, d) and (mask.sum(dim=1) == n - keep).all()
    assert (torch.sort(ids_restore, dim=1).values == torch.arange(n)).all()  # a permutation
    for i in range(b):  # the visible tokens are exactly the unmasked positions
        assert sorted(visible[i, :, 0].long().tolist()) == (x[i, :, 0][mask[i] == 0]).long().tolist()


def test_block_masks_are_contiguous_where_random_ones_are_not():
    from mae_search.mae.masking import mask_patches

    torch.manual_seed(0)
    x = torch.zeros(256, 64, 1)
    random = _masked_neighbours(mask_patches(x, 0.5, "random")[1])
    block = _masked_neighbours(mask_patches(x, 0.5, "block")[1])
    # At ratio 0.5 on 8 x 8, a random mask gives a masked patch about 1.75 masked neighbours (4 x 0.5 less
    # the border); rectangles give most of theirs.
    assert block > random + 0.8, (block, random)


def test_grid_keeps_exactly_one_patch_of_every_2x2_group():
    from mae_search.mae.masking import mask_patches

    torch.manual_seed(1)
    mask = mask_patches(torch.zeros(32, 64, 1), 0.75, "grid")[1].reshape(32, 4, 2, 4, 2)
    kept_per_group = (1 - mask).sum(dim=(2, 4))
    assert (kept_per_group == 1).all()
    corners = {tuple((1 - mask[i, 0, :, 0, :]).nonzero()[0].tolist()) for i in range(32)}
    assert len(corners) == 4  # the kept corner is drawn per sample, not fixed


def test_masks_derive_from_the_seed():
    from mae_search.mae.masking import mask_patches

    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(mask_patches(torch.zeros(8, 64, 1), 0.6, "block")[1])
    assert torch.equal(*draws)


def test_grid_sampling_refuses_ratios_and_geometries_it_cannot_keep():
    from mae_search.config import ConfigError, TrainConfig

    with pytest.raises(ValueError, match="strategy grid keeps one patch of every 2 x 2, a fixed ratio of 0.75: "
                                         "mask_ratio 0.6 cannot"):
        MaskingConfig(strategy="grid", mask_ratio=0.6)
    with pytest.raises(ValueError, match="0.75 with a curriculum cannot be grid sampled"):
        MaskingConfig(strategy="grid", curriculum=True)
    with pytest.raises(ConfigError, match="grid needs an even number of patches a side.*gives 7"):
        TrainConfig.from_dict({"model": {"img_size": 28, "patch_size": 4}, "masking": {"strategy": "grid"}})
