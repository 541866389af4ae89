"""SCFS feature search against a naive per-location loop written from spec scfs.md §2.3."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.feature_search import feature_search, pooled_query, searched_targets

L, B, C, H, W = 3, 2, 5, 4, 3


def naive_search(local_maps: torch.Tensor, key_map: torch.Tensor) -> torch.Tensor:
    """local_maps (L, B, C, h, w), key_map (B, C, H, W) -> (L*B, C, H, W), crop-major, with explicit loops."""
    n_l, n_b, n_c = local_maps.shape[:3]
    out = torch.zeros(n_l * n_b, n_c, *key_map.shape[-2:], dtype=torch.float64)
    for i in range(n_l):
        for b in range(n_b):
            q = [float(local_maps[i, b, c].mean()) for c in range(n_c)]
            q_norm = math.sqrt(sum(v * v for v in q))
            for h in range(key_map.shape[-2]):
                for w in range(key_map.shape[-1]):
                    t = [float(key_map[b, c, h, w]) for c in range(n_c)]
                    t_norm = math.sqrt(sum(v * v for v in t))
                    cos = sum(a * k for a, k in zip(q, t)) / (q_norm * t_norm)
                    for c in range(n_c):
                        out[i * n_b + b, c, h, w] = cos * t[c]
    return out


def _relu_maps(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64))


def test_matches_naive_loop_crop_major():
    local_maps = _relu_maps(L, B, C, 2, 2, seed=0)
    key_map = _relu_maps(B, C, H, W, seed=1) + 0.01  # no all-zero location
    query = pooled_query(local_maps.flatten(0, 1)).unflatten(0, (L, B))
    out = feature_search(query, key_map)
    assert out.shape == (L * B, C, H, W)
    torch.testing.assert_close(out, naive_search(local_maps, key_map), rtol=1e-10, atol=1e-12)


def test_reweights_unnormalised_teacher_map_without_softmax():
    """Query scale does not matter (it is normalised); the teacher map's scale passes straight through (it is
    re-weighted, not normalised); post-ReLU inputs give weights in [0, 1] and every location is kept."""
    query = _relu_maps(L, B, C, seed=2)
    key_map = _relu_maps(B, C, H, W, seed=3) + 0.01
    out = feature_search(query, key_map)
    torch.testing.assert_close(feature_search(7.0 * query, key_map), out)
    torch.testing.assert_close(feature_search(query, 3.0 * key_map), 3.0 * out)
    weight = out.norm(dim=1) / key_map.repeat(L, 1, 1, 1).norm(dim=1)  # |A(h, w)| per location
    assert (weight >= 0).all() and (weight <= 1 + 1e-12).all()
    assert (weight > 0).all()  # no top-k / threshold: every location survives
    # weights are cosines, not a softmax over locations: they do not sum to 1
    assert not torch.allclose(weight.sum(dim=(-2, -1)), torch.ones(L * B, dtype=torch.float64))


def test_pooled_query_is_detached():
    maps = torch.rand(4, C, 2, 2, requires_grad=True)
    q = pooled_query(maps)
    assert not q.requires_grad
    torch.testing.assert_close(q, maps.detach().mean(dim=(2, 3)))


def test_searched_targets_run_the_given_heads_on_the_searched_batch():
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 6)).double() for _ in range(2)]
    queries = [_relu_maps(L, B, C, seed=4), _relu_maps(L, B, C, seed=5)]
    keys = [_relu_maps(B, C, H, W, seed=6), _relu_maps(B, C, H, W, seed=7)]
    out = searched_targets(heads, queries, keys)
    assert [t.shape for t in out] == [(L, B, 6), (L, B, 6)]
    for k in range(2):
        torch.testing.assert_close(out[k], heads[k](feature_search(queries[k], keys[k])).unflatten(0, (L, B)))
    assert not out[0].requires_grad  # no gradient through the search side
    with pytest.raises(ValueError, match="one of each per stage"):
        searched_targets(heads, queries[:1], keys)


def test_shape_errors():
    with pytest.raises(ValueError, match="matching B, C"):
        feature_search(torch.rand(L, B, C), torch.rand(B, C + 1, H, W))
    with pytest.raises(ValueError, match="matching B, C"):
        feature_search(torch.rand(B, C), torch.rand(B, C, H, W))
