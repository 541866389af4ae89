"""EMA center of teacher outputs (DINO, SCFS), its update split into an async reduce and an apply.

With ``t_r`` the teacher outputs of the rows on rank r (every crop and image that feeds the center)::

    c <- m c + (1 - m) * (sum_r sum_rows t_r) / (sum_r rows_r)

``start_center_reduce`` starts one all-reduce of the rank's batch sum packed with its row count, so the
communication overlaps the backward pass; ``apply_center_update`` waits for it and moves the center after the
optimiser step. The loss of a step therefore always sees the center from before that step, and forward never
changes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from losses.common import at_least_fp32
from runtime import dist


def batch_column_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every row of ``x`` (..., D) -> (D,), fp32 at least (fp64 stays fp64), without gradient."""
    return at_least_fp32(x.detach()).flatten(0, -2).sum(dim=0)


class CenteredLoss(nn.Module):
    """Base of the losses that keep an EMA ``center`` buffer (checkpointed with ``state_dict``).

    Args:
        center_shape: shape of the center, e.g. (K,) for one head or (n_stages, D) for one center per stage.
        center_momentum: m in the update above.
    """

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float):
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: tuple[torch.Tensor, Any] | None = None  # (packed sums and count, all-reduce handle)

    @torch.no_grad()
    def start_center_reduce(self, batch_sum: torch.Tensor, count: int) -> None:
        """Start the cross-rank sum of this rank's ``batch_sum`` (shaped like the center) over ``count`` rows.

        One collective carries the sums and the count. No host sync: the count is filled on the device.
        """
        if batch_sum.shape != self.center.shape:
            raise ValueError(f"{type(self).__name__}: center batch sum must have shape {tuple(self.center.shape)}, "
                             f"got {tuple(batch_sum.shape)}")
        packed = torch.cat([batch_sum.flatten(), batch_sum.new_full((1,), float(count))])
        self._pending = (packed, dist.all_reduce_sum(packed, async_op=True))

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """c <- m c + (1 - m) * the cross-rank mean started by ``start_center_reduce``; a no-op if none is pending."""
        if self._pending is None:
            return
        packed, handle = self._pending
        if handle is not None:
            handle.wait()
        mean = packed[:-1].view_as(self.center) / packed[-1]
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
        self._pending = None
