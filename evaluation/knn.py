"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, as used by DINO).

Each query votes for the classes of its k most similar bank features with weight ``exp(sim / T)``. Memory stays
bounded for ImageNet-size banks: queries are processed in chunks of ``query_chunk`` and, within a chunk, the bank in
slices of ``bank_chunk`` whose top-k are merged with the running top-k, so at most ``query_chunk x (bank_chunk + k)``
similarities exist at once (256 x 262144 floats = 256 MiB by default), whatever the bank size. The top-k of the
largest k is computed once and reused for every smaller k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_topk(bank: torch.Tensor, queries: torch.Tensor, k: int, query_chunk: int = 256,
             bank_chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k neighbours of each query.

    Args:
        bank: (N, D) features; queries: (Q, D) (both normalised here). k: neighbours (clamped to N).
    Returns:
        (similarities (Q, k) float32 sorted descending, bank indices (Q, k) int64).
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, idxs = [], []
    for q in queries.split(query_chunk):
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
        for start in range(0, bank.shape[0], bank_chunk):
            s = q @ bank[start : start + bank_chunk].T  # (c, b)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            best_s, pos = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + start], 1).gather(1, pos)
        sims.append(best_s)
        idxs.append(best_i)
    return torch.cat(sims), torch.cat(idxs)


def vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """(Q, k) similarities and labels of the neighbours -> (Q, C) summed vote weights ``exp(sim / T)``."""
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels, (sims / temperature).exp())


@torch.no_grad()
def knn_predict_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                       k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Class scores of each query.

    Args:
        bank: (N, D) features (normalised here). bank_labels: (N,) int64. queries: (Q, D).
        num_classes: C. k: neighbours (clamped to N). temperature: T of the vote weight.
    Returns:
        (Q, C) summed vote weights.
    """
    sims, idx = knn_topk(bank, queries, k, query_chunk=chunk)
    return vote(sims, bank_labels[idx], num_classes, temperature)


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = top == labels[:, None]
    return {"top1": 100.0 * correct[:, 0].float().mean().item(), "top5": 100.0 * correct.any(1).float().mean().item()}


@torch.no_grad()
def knn_accuracies(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                   ks: tuple[int, ...] = (10, 20, 100), temperature: float = 0.07,
                   num_classes: int | None = None, query_chunk: int = 256,
                   bank_chunk: int = 262144) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 accuracy (in %) for every k: ``{'k20': {'top1': ..., 'top5': ...}, ...}``.

    One neighbour search with the largest k; the first k columns of the sorted result serve the smaller ks.
    """
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    sims, idx = knn_topk(bank, queries, max(ks), query_chunk, bank_chunk)
    neighbour_labels = bank_labels.to(idx.device)[idx]
    query_labels = query_labels.to(sims.device)
    return {f"k{k}": _accuracy(vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature), query_labels)
            for k in ks}


