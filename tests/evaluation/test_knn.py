"""Weighted kNN against a brute-force float64 reference (loop over queries, full sort of all similarities)."""

import math

import pytest
import torch

from evaluation.knn import knn_accuracies, knn_predict_scores, knn_topk


def reference_scores(bank, bank_labels, queries, num_classes, k, temperature):
    """Per query: cosine to every bank row, full descending sort, sum exp(sim / T) of the k first per class."""
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    for i, q in enumerate(queries.double()):
        sims = [(float(q @ row) / float(q.norm()), j) for j, row in enumerate(b)]
        sims.sort(key=lambda t: -t[0])
        for s, j in sims[:k]:
            out[i, int(bank_labels[j])] += math.exp(s / temperature)
    return out


def reference_accuracy(scores, labels):
    top1 = (scores.argmax(1) == labels).double().mean() * 100
    top5 = (scores.topk(min(5, scores.shape[1]), 1).indices == labels[:, None]).any(1).double().mean() * 100
    return float(top1), float(top5)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(157, 12, generator=g), torch.randn(23, 12, generator=g)
    return bank, torch.randint(0, 7, (157,), generator=g), queries, torch.randint(0, 7, (23,), generator=g)


@pytest.mark.parametrize("query_chunk,bank_chunk", [(256, 262144), (5, 16), (1, 7)])
def test_topk_matches_full_sort_for_any_chunking(data, query_chunk, bank_chunk):
    bank, _, queries, _ = data
    sims, idx = knn_topk(bank, queries, 20, query_chunk, bank_chunk)
    unit = torch.nn.functional.normalize
    full = unit(queries.double(), dim=1) @ unit(bank.double(), dim=1).T
    ref_s, ref_i = full.sort(dim=1, descending=True)
    torch.testing.assert_close(sims.double(), ref_s[:, :20], rtol=0, atol=1e-5)
    assert torch.equal(idx, ref_i[:, :20])


@pytest.mark.parametrize("k", [1, 10, 20, 100, 500])  # 500 > bank size: clamped to all neighbours
def test_scores_match_reference(data, k):
    bank, bank_y, queries, _ = data
    got = knn_predict_scores(bank, bank_y, queries, 7, k=k, temperature=0.07, chunk=4)
    ref = reference_scores(bank, bank_y, queries, 7, min(k, len(bank)), 0.07)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)


def test_multi_k_accuracies_match_reference(data):
    bank, bank_y, queries, query_y = data
    res = knn_accuracies(bank, bank_y, queries, query_y, (10, 20, 100), 0.07, query_chunk=3, bank_chunk=40)
    for k in (10, 20, 100):
        top1, top5 = reference_accuracy(reference_scores(bank, bank_y, queries, 7, k, 0.07), query_y)
        assert res[f"k{k}"]["top1"] == pytest.approx(top1) and res[f"k{k}"]["top5"] == pytest.approx(top5)


def test_clustered_data_is_classified():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 4
    y_bank, y_q = torch.arange(200) % 5, torch.arange(50) % 5
    bank = centers[y_bank] + torch.randn(200, 32, generator=g)
    queries = centers[y_q] + torch.randn(50, 32, generator=g)
    assert knn_accuracies(bank, y_bank, queries, y_q, (20,))["k20"]["top1"] == 100.0
