"""Feature evaluation: pooled features in their own memory, the k-NN weighted vote, and the same k-NN answer
however the similarities are blocked."""

import math

import pytest
import torch
import torch.nn.functional as F

from mae_search.evaluate import knn_accuracy, nearest, pooled


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
def test_pooled_features_do_not_keep_the_token_tensor_alive(pool):
    tokens = torch.randn(8, 65, 32)
    feature = pooled(tokens, pool)
    assert feature.shape == (8, 32) and feature.dtype == torch.float32
    # Its own storage of 8 x 32 floats, not a view into the 8 x 65 x 32 tokens.
    assert feature.untyped_storage().nbytes() == 8 * 32 * 4
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
    assert torch.equal(feature, expected)
