"""[4] SCFS feature search: teacher global-crop maps re-weighted by their cosine to a student local-crop query.

Reference: skyoux/scfs @ 7bb7c37 ``models/scfs.py::TeacherWrapper.forward``; notes ``docs/methods/scfs.md``
("Feature search").

For stage k, local crop i and image b::

    q      = normalize_C( mean_{h,w} F^s_k(l_i)_b )                    student local pooled feature (detached)
    A(h,w) = < q , T_b(:,h,w) / ||T_b(:,h,w)|| >                      T = teacher map of global crop 1 only
    S      = A(h,w) * T_b(:,h,w)                                       the *un-normalised* map, re-weighted per location

There is no softmax, top-k, threshold or box step: the searched map keeps every location, scaled by its cosine
(in [0, 1] when both maps are post-ReLU). The searched maps then go through the **teacher's** shallow head.
Letters: L local crops, B per-rank batch, C stage channels, H x W teacher map size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pooled_query(local_maps: torch.Tensor) -> torch.Tensor:
    """Spatial mean of student local-crop stage maps, detached. (N, C, h, w) -> (N, C)."""
    return local_maps.detach().mean(dim=(-2, -1))


def feature_search(query: torch.Tensor, key_map: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Re-weight the teacher map of every image by its per-location cosine to each local query.

    Args:
        query: (L, B, C) pooled student local features (normalised here; the caller passes them detached).
        key_map: (B, C, H, W) teacher stage map of the searched global crop.
        eps: floor of the L2 norms (``F.normalize``).
    Returns:
        (L*B, C, H, W) searched maps, crop-major (rows ``i*B:(i+1)*B`` belong to local crop ``i``).
    """
    if query.dim() != 3 or key_map.dim() != 4 or query.shape[1:] != key_map.shape[:2]:
        raise ValueError(f"feature_search: need query (L, B, C) and key_map (B, C, H, W) with matching B, C; got "
                         f"{tuple(query.shape)} and {tuple(key_map.shape)}")
    q = F.normalize(query, dim=-1, eps=eps)
    keys = F.normalize(key_map, dim=1, eps=eps)
    sim = torch.einsum("lbc,bchw->lbhw", q.to(keys.dtype), keys)  # cosine map A, (L, B, H, W)
    searched = sim.unsqueeze(2) * key_map.unsqueeze(0)  # (L, B, C, H, W)
    return searched.flatten(0, 1)


@torch.no_grad()
def searched_targets(teacher_heads: Sequence[nn.Module], queries: Sequence[torch.Tensor],
                     key_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Teacher shallow-head outputs on the searched maps, one entry per stage.

    Args:
        teacher_heads: the teacher's shallow head of each stage (BN in batch-statistics mode over the L*B maps).
        queries: per stage (L, B, C_k) pooled student local features.
        key_maps: per stage (B, C_k, H_k, W_k) teacher maps of global crop 1.
    Returns:
        per stage (L, B, D) unit vectors ``v^t_{k,i,b}``.
    """
    if not len(teacher_heads) == len(queries) == len(key_maps):
        raise ValueError(f"searched_targets: got {len(teacher_heads)} heads, {len(queries)} queries, "
                         f"{len(key_maps)} key maps; need one of each per stage")
    out = []
    for head, q, keys in zip(teacher_heads, queries, key_maps):
        n_local = q.shape[0]
        out.append(head(feature_search(q, keys)).unflatten(0, (n_local, -1)))
    return out
