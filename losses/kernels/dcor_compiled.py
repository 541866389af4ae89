"""CPU fused path for MV-MR's distance correlations: all dCor(x_r, y) terms against one shared ``y`` in one pass.

Same maths as ``losses.mvmr.distance_correlation`` (the definition), reorganised:

* ``y`` (the augmented-view embedding ``z_a``) is the second argument of every dCor term of the MV-MR loss; its
  double-centred distance matrix ``B`` is built once, not once per term.
* Double centring is the projection ``A = H a H`` (``H = I - 11^T / N``), so ``<A, B> = <a, B>`` and the gradient
  of ``S_ab = mean(A o B)`` with respect to the raw distances ``a`` is ``B / N^2`` (``2 A / N^2`` for ``S_aa``).
  With ``R = sqrt(S_ab / sqrt(S_aa S_bb))``::

      dR/da = R (B / S_ab - A / S_aa) / (2 N^2)        dR/db = R (A / S_ab - B / S_bb) / (2 N^2)

* Through ``a_ij = sqrt(max(d2_ij, c))``, ``d2_ij = |x_i|^2 - 2 x_i.x_j + |x_j|^2``: with the symmetric
  ``g = dR/da * [d2 >= c] / (2 a)``, ``dR/dx = 4 (rowsum(g) x - g x)``: one (N, N) x (N, F) matmul per input.

The forward keeps per input one (N, N) centred matrix and one (N, N) weight ``[d2 >= c] / (2 a)``. The (N, N) steps
are ``torch.compile``'d (``dynamic=True``; clamps enter as 0-dim tensors); ``compile=False`` runs them eagerly.
"""

from __future__ import annotations

import functools

import torch


def _centred(x: torch.Tensor, clamp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, F) fp32 -> double-centred distances A (N, N), backward weight [d2 >= c] / (2 a) (N, N)."""
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] - 2.0 * (x @ x.T) + sq[None, :]
    a = d2.clamp(min=clamp).sqrt()
    w = torch.where(d2 >= clamp, 0.5 / a, torch.zeros_like(a))
    centred = a - a.mean(dim=0, keepdim=True) - a.mean(dim=1, keepdim=True) + a.mean()
    return centred, w


def _moments(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(A o B), mean(A o A) in one pass over (N, N)."""
    return (a * b).mean(), (a * a).mean()


def _grad_input(x: torch.Tensor, g_a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dL/dx (N, F) from dL/da (N, N) (symmetric) and the weight of ``_centred``."""
    g = g_a * w
    return 4.0 * (g.sum(dim=1, keepdim=True) * x - g @ x)


@functools.cache
def _compiled(name: str):
    fn = {"centred": _centred, "moments": _moments, "grad": _grad_input}[name]
    return torch.compile(fn, dynamic=True)


def _fns(compile: bool):
    if compile:
        return _compiled("centred"), _compiled("moments"), _compiled("grad")
    return _centred, _moments, _grad_input


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().contiguous()


class _DCorMany(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, y_clamp, x_clamps, compile, *xs):
        centred, moments, _ = _fns(compile)
        dev = y.device
        yf = _fp32(y)
        b, w_b = centred(yf, torch.tensor(y_clamp, dtype=torch.float32, device=dev))
        s_bb = moments(b, b)[0]
        out, saved = [], []
        for k, (x, c) in enumerate(zip(xs, x_clamps)):
            xf = _fp32(x)
            a, w_a = centred(xf, torch.tensor(c, dtype=torch.float32, device=dev))
            s_ab, s_aa = moments(a, b)
            r = (s_ab / (s_aa * s_bb).sqrt()).sqrt()
            out.append(r)
            saved += [xf if ctx.needs_input_grad[4 + k] else None, a, w_a, s_ab, s_aa, r]
        ctx.save_for_backward(yf, b, w_b, s_bb, *saved)
        ctx.compile = compile
        ctx.dtypes = (y.dtype,) + tuple(x.dtype for x in xs)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad_r):
        _, _, grad_input = _fns(ctx.compile)
        yf, b, w_b, s_bb, *saved = ctx.saved_tensors
        n2 = float(b.shape[0]) ** 2
        g_b = torch.zeros_like(b)
        grads_x = []
        for k in range(len(saved) // 6):
            xf, a, w_a, s_ab, s_aa, r = saved[6 * k:6 * k + 6]
            coef = grad_r[k].float() * r / (2.0 * n2)
            g_b += coef * (a / s_ab - b / s_bb)
            g_x = None
            if xf is not None:
                g_x = grad_input(xf, coef * (b / s_ab - a / s_aa), w_a).to(ctx.dtypes[1 + k])
            grads_x.append(g_x)
        g_y = grad_input(yf, g_b, w_b).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        return (g_y, None, None, None, *grads_x)


def distance_correlations_compiled(y: torch.Tensor, xs: list[torch.Tensor], y_clamp: float,
                                   x_clamps: list[float], compile: bool = True) -> torch.Tensor:
    """``stack([distance_correlation(x_r, y, x_clamps[r], y_clamp) for r])`` with ``y``'s matrix built once.

    Args:
        y: (N, Q) shared second variable (MV-MR: ``z_a``); may require grad.
        xs: R tensors (N, P_r) (MV-MR: ``z_o`` and the flattened target representations); each may require grad.
        y_clamp: clamp of ``y``'s squared distances.
        x_clamps: R clamps of the ``xs``' squared distances.
        compile: run the (N, N) steps through ``torch.compile`` (False: same code, eager).
    Returns:
        (R,) fp32 distance correlations (not squared), differentiable in ``y`` and every ``x_r``.
    """
    if len(xs) != len(x_clamps) or not xs:
        raise ValueError(f"need one clamp per input and at least one input, got {len(xs)} inputs, "
                         f"{len(x_clamps)} clamps")
    for x in [y, *xs]:
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"distance correlation needs (N, F) inputs with N = {y.shape[0]}, got {tuple(x.shape)}")
    return _DCorMany.apply(y, float(y_clamp), tuple(float(c) for c in x_clamps), compile, *xs)
