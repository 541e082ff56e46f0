"""Feature evaluation: features collected in one buffer, the k-NN weighted vote, and the same k-NN answer
however the similarities are blocked."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from mae_search.training.evaluate import collect_features, extract_features, knn_accuracy, nearest


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_the_nearest_neighbour_outvotes_farther_ones_at_a_low_temperature():
    # One class-0 feature at 0 degrees; two class-1 features at 40 and 50 degrees. A query at 10 degrees has
    # its class-0 neighbour far closer: with temperature 0.07 its single vote beats the two others.
    train_x = torch.tensor([unit(0), unit(40), unit(50)])
    train_y = torch.tensor([0, 1, 1])
    query = torch.tensor([unit(10)])
    assert knn_accuracy(train_x, train_y, query, torch.tensor([0]), k=3, temperature=0.07) == 1.0
    # At a high temperature the votes are nearly equal and the majority wins.
    assert knn_accuracy(train_x, train_y, query, torch.tensor([1]), k=3, temperature=100.0) == 1.0
    # With k=1 only the nearest votes, and a wrong label scores 0.
    assert knn_accuracy(train_x, train_y, query, torch.tensor([1]), k=1) == 0.0


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature):
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(test_x), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (top / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


@pytest.mark.parametrize("train_chunk", [1, 7, 64, 10_000])
def test_blocked_similarities_give_the_brute_force_answer(train_chunk):
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=gen), torch.randn(50, 16, generator=gen)
    train_y, test_y = torch.randint(0, 5, (300,), generator=gen), torch.randint(0, 5, (50,), generator=gen)
    expected = brute_force_knn(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    got = knn_accuracy(train_x, train_y, test_x, test_y, k=20, test_chunk=13, train_chunk=train_chunk)
    assert got == pytest.approx(expected)
    # The neighbours themselves, not only the score, match a single full comparison.
    sims, idx = nearest(test_x, train_x, 20, train_chunk)
    full_sims, full_idx = (test_x @ train_x.T).topk(20, dim=1)
    assert torch.equal(idx, full_idx) and torch.allclose(sims, full_sims)


def test_k_larger_than_the_training_set_uses_every_feature():
    train_x, train_y = torch.tensor([unit(0), unit(90)]), torch.tensor([0, 1])
    sims, idx = nearest(torch.tensor([unit(10)]), train_x, k=20, chunk=1)
    assert idx.tolist() == [[0, 1]] and sims.shape == (1, 2)
    assert knn_accuracy(train_x, train_y, torch.tensor([unit(10)]), torch.tensor([0]), k=20) == 1.0


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_features_are_written_into_one_buffer_not_kept_with_their_tokens(micro_cfg, pool):
    from mae_search.data.memory import ImageSet, normalize
    from mae_search.mae.model import MaskedAutoencoderViT

    torch.manual_seed(0)
    model = MaskedAutoencoderViT(micro_cfg.model)
    size = micro_cfg.model.img_size
    images = torch.randint(0, 256, (10, 3, size, size), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(10) % 3, ("a", "b", "c"))
    feats, labels = extract_features(model, data, pool, torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        tokens = model.eval().forward_features(normalize(data.images))
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
    torch.testing.assert_close(feats, expected)
    assert torch.equal(labels, data.labels)
    # Three batches, one allocation of 10 x D floats: neither the batches' (B, 1 + L, D) tokens nor a second
    # copy made by joining per-batch pieces.
    assert feats.untyped_storage().nbytes() == 10 * model.cfg.embed_dim * 4


def test_a_batch_tokens_are_freed_before_the_next_batch_is_read():
    alive = []

    def featurize(images):
        tokens = torch.randn(len(images), 65, 8)
        alive.append(weakref.ref(tokens))
        return tokens[:, 0]  # a view: it keeps all the tokens alive as long as it lives

    def batches():
        for i in range(3):
            assert all(ref() is None for ref in alive), f"batch {i - 1}'s tokens outlived it"
            yield torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64)

    feats, _ = collect_features(batches(), count=12, featurize=featurize)
    assert feats.shape == (12, 8) and len(alive) == 3


def test_more_images_than_announced_grow_the_buffer_and_none_is_lost():
    batches = [(torch.full((3, 2), float(i)), torch.full((3,), i)) for i in range(4)]
    feats, labels = collect_features(batches, count=2, featurize=lambda x: x)
    assert feats.shape == (12, 2) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(feats[:, 0], labels.float())


def test_an_empty_split_is_named_not_a_shape_error():
    with pytest.raises(ValueError, match="split is empty"):
        collect_features([], count=0, featurize=lambda x: x)
