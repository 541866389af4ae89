"""LARS (You et al. 2017) as used by BYOL/Barlow Twins-style recipes: SGD whose update is rescaled per tensor by the
trust ratio ``eta * ||w|| / ||g + wd w||``. Groups with ``lars_exclude=True`` (biases, norms) get plain SGD."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    # trust ratio without host sync: where either norm is 0 fall back to 1
                    ok = (w_norm > 0) & (g_norm > 0)
                    q = torch.where(ok, group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g.mul(q)
                buf = self.state[p].get("mu")
                if buf is None:
                    buf = self.state[p]["mu"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss
