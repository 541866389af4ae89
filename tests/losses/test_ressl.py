"""ReSSL loss and queue vs a naive float64 reference written from the equations (spec ressl.md §1.2-1.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.ressl import ReSSLLoss


def naive_ressl_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float):
    """Loops over crops s, samples n and queue entries j.  q (S, B, D) unit, k (B, D) unit, queue (K, D)."""
    n_s, n_b = q.shape[0], q.shape[1]
    n_k = queue.shape[0]
    total = q.new_zeros(())
    for s in range(n_s):
        for n in range(n_b):
            a = [torch.dot(q[s, n], queue[j]) / tau_s for j in range(n_k)]
            b = [torch.dot(k[n], queue[j]).item() / tau_t for j in range(n_k)]
            b_max = max(b)
            p = [math.exp(x - b_max) for x in b]
            p_sum = sum(p)
            log_z = torch.logsumexp(torch.stack(a), dim=0)
            for j in range(n_k):
                total = total - (p[j] / p_sum) * (a[j] - log_z)
    return total / (n_s * n_b)


def naive_ring_buffer(queue: list, ptr: int, keys: torch.Tensor) -> int:
    for row in keys:
        queue[ptr] = row.clone()
        ptr = (ptr + 1) % len(queue)
    return ptr


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n_crops", [1, 3])
def test_loss_and_grad_match_reference(n_crops: int):
    loss_fn = ReSSLLoss(dim=8, queue_size=16, student_temp=0.1, teacher_temp=0.04).double()
    z = torch.randn(n_crops, 5, 8, dtype=torch.float64, requires_grad=True)  # raw projector outputs
    k = _unit(5, 8)
    loss = loss_fn(F.normalize(z, dim=-1), k)
    z_ref = z.detach().clone().requires_grad_(True)
    ref = naive_ressl_loss(F.normalize(z_ref, dim=-1), k, loss_fn.queue.clone(), 0.1, 0.04)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-7, atol=1e-12)


def test_gradient_matches_closed_form():
    """dL/dq_n = (1 / (M tau_s)) Q^T (softmax(a_n / tau_s) - p_n), M rows (spec §1.3)."""
    tau_s, tau_t = 0.1, 0.04
    loss_fn = ReSSLLoss(dim=6, queue_size=10, student_temp=tau_s, teacher_temp=tau_t).double()
    q = _unit(4, 6).requires_grad_(True)
    k = _unit(4, 6)
    loss_fn(q, k).backward()
    queue = loss_fn.queue
    p = torch.softmax(k @ queue.T / tau_t, dim=1)
    s = torch.softmax(q.detach() @ queue.T / tau_s, dim=1)
    expected = (s - p) @ queue / (4 * tau_s)
    torch.testing.assert_close(q.grad, expected, rtol=1e-9, atol=1e-12)


def test_teacher_gets_no_gradient():
    loss_fn = ReSSLLoss(dim=6, queue_size=10)
    q = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_(True)
    k = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_(True)
    loss_fn(q, k).backward()
    assert k.grad is None and q.grad is not None


def test_queue_init_is_unit_and_seeded():
    a, b, c = ReSSLLoss(8, 32, init_seed=1), ReSSLLoss(8, 32, init_seed=1), ReSSLLoss(8, 32, init_seed=2)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(32))
    assert torch.equal(a.queue, b.queue) and not torch.equal(a.queue, c.queue)
    assert int(a.queue_ptr) == 0


@pytest.mark.parametrize("batch", [4, 5])  # 4 divides K=12 (the official case); 5 exercises a split wrap-around
def test_multi_step_state_and_loss_match_reference(batch: int):
    torch.manual_seed(1)
    loss_fn = ReSSLLoss(dim=5, queue_size=12, student_temp=0.2, teacher_temp=0.05).double()
    ref_queue = [row.clone() for row in loss_fn.queue]
    ref_ptr = 0
    for _ in range(5):
        q, k = _unit(2, batch, 5), _unit(batch, 5)
        loss = loss_fn(q, k)  # before enqueue: the current keys are not in the queue
        ref = naive_ressl_loss(q, k, torch.stack(ref_queue), 0.2, 0.05)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
        loss_fn.enqueue(k)
        ref_ptr = naive_ring_buffer(ref_queue, ref_ptr, k)
        assert int(loss_fn.queue_ptr) == ref_ptr
        assert torch.equal(loss_fn.queue, torch.stack(ref_queue))


def test_state_dict_round_trip_keeps_queue_and_pointer():
    a = ReSSLLoss(4, 8)
    a.enqueue(F.normalize(torch.randn(4, 4), dim=-1))
    b = ReSSLLoss(4, 8, init_seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.queue, b.queue) and int(b.queue_ptr) == 4


def test_enqueue_before_backward_is_an_error():
    """The forward reads the queue without cloning it; enqueueing early must fail loudly, not corrupt gradients."""
    loss_fn = ReSSLLoss(4, 8)
    q = F.normalize(torch.randn(4, 4), dim=-1).requires_grad_(True)
    loss = loss_fn(q, F.normalize(torch.randn(4, 4), dim=-1))
    loss_fn.enqueue(F.normalize(torch.randn(4, 4), dim=-1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_shapes_raise():
    loss_fn = ReSSLLoss(4, 8)
    with pytest.raises(ValueError, match="expected student"):
        loss_fn(torch.randn(2, 3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected student"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="enqueue expects"):
        loss_fn.enqueue(torch.randn(3, 5))


def test_fp32_under_bf16_autocast():
    loss_fn = ReSSLLoss(16, 64)
    q, k = F.normalize(torch.randn(2, 8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    ref = loss_fn(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = loss_fn(q, k)
        rounded = loss_fn(q.bfloat16(), k.bfloat16())  # embeddings produced by a bf16 network
    assert same.dtype == torch.float32 and rounded.dtype == torch.float32
    torch.testing.assert_close(same, ref)  # the island runs the fp32 math exactly
    torch.testing.assert_close(rounded, ref, rtol=2e-2, atol=0)  # bf16 input rounding only (stated tolerance)
