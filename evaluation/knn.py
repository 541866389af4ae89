"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, as used by DINO).

Each query votes for the classes of its k most similar bank features with weight ``exp(sim / T)``. Similarities are
computed in chunks of queries so memory stays bounded by ``chunk x N_bank`` for ImageNet-size banks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                       k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores of each query.

    Args:
        bank: (N, D) features (normalised here). bank_labels: (N,) int64. queries: (Q, D).
        num_classes: C. k: neighbours (clamped to N). temperature: T of the vote weight.
    Returns:
        (Q, C) summed vote weights.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (c, k)
        weights = (sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, bank_labels[idx], weights)
        out.append(scores)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) of weighted kNN."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = knn_predict_scores(bank, bank_labels, queries, num_classes, k, temperature, chunk)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == query_labels[:, None]
    return {"top1": 100.0 * correct[:, 0].float().mean().item(), "top5": 100.0 * correct.any(1).float().mean().item()}
