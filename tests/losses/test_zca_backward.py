"""The ZCA inverse square root's closed-form backward (Daleckii-Krein): the derivative autograd through ``eigh``
gives where eigenvalues are distinct, and a finite, correct one where they coincide (CW-RGP's NaN on real data)."""

from __future__ import annotations

import torch

from losses.whitening import group_channel_whiten, zca_isqrt


def _eigh_isqrt(sigma: torch.Tensor) -> torch.Tensor:
    """The same matrix function differentiated by autograd through ``eigh`` (the upstream way, via ``svd``)."""
    eig, u = torch.linalg.eigh(sigma)
    return (u * eig.rsqrt().unsqueeze(-2)) @ u.mT


def _spd(x: torch.Tensor) -> torch.Tensor:
    return x @ x.mT / (x.shape[-1] - 1) + 0.1 * torch.eye(x.shape[-2], dtype=x.dtype)


def test_distinct_eigenvalues_match_autograd_through_eigh_and_gradcheck():
    x = torch.randn(3, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(3, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(((zca_isqrt(_spd(x)) @ x) * w).sum(), x)[0]
    ref = torch.autograd.grad(((_eigh_isqrt(_spd(x)) @ x) * w).sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: zca_isqrt(0.5 * (s + s.mT)), (_spd(x).detach().requires_grad_(),))


def test_repeated_eigenvalues_give_the_closed_form_gradient_where_eigh_autograd_is_not_finite():
    # every sample constant over its channels: centred to 0, so each group's Gram matrix is exactly eps * I (one
    # eigenvalue, n times) and the output is eps^-1/2 * x_centred; its gradient is the centred upstream gradient
    # over sqrt(eps)
    eps, n, dim = 1e-3, 8, 32
    x = torch.arange(float(n)).unsqueeze(-1).expand(n, dim).contiguous().requires_grad_(True)
    perm = torch.randperm(dim, generator=torch.Generator().manual_seed(0))
    w = torch.randn(n, dim, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((group_channel_whiten(x, perm, groups=2, eps=eps) * w).sum(), x)[0]
    torch.testing.assert_close(got, (w - w.mean(-1, keepdim=True)) / eps**0.5, rtol=1e-5, atol=1e-5)
    sigma = (eps * torch.eye(n)).requires_grad_(True)
    assert not torch.isfinite(torch.autograd.grad((_eigh_isqrt(sigma) * w[:, :n]).sum(), sigma)[0]).all()
