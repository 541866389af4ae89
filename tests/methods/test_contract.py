"""The contract every registered method keeps with the generic trainer, generated from the METHODS registry.

For each method, on its demo recipe with a batch of 8 random images at half the crop size: the loss is finite;
gradients reach the student only; ``state_dict`` round-trips into a fresh instance with the same loss; the teacher
changes in ``after_step`` and nowhere else; two builds from the same seed are identical; and the class names its
evaluation weights and its linear-probe preset. A new method is covered by registering it (and its demo recipe).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from engine.config import load_config
from evaluation.config import PROTOCOLS
from methods import METHODS, StepContext, build_method

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B = 8
#: the few keys a batch of 8 needs beyond each demo recipe (whitening groups must divide the batch)
SMALL = {"cw_rgp": ["ssl.w_size=8"]}
CTX = StepContext(step=3, epoch=0, steps_per_epoch=10, total_steps=100)


def _cfg(name: str):
    demo = os.path.join(ROOT, "configs", "exp", f"{name}_demo.yaml")
    assert os.path.exists(demo), f"method {name!r} has no demo recipe configs/exp/{name}_demo.yaml"
    cfg = load_config(name, [demo], ["train.tensorboard=false", f"data.batch_size={B}", *SMALL.get(name, [])])
    for v in cfg.data.views:  # half-size crops: the contract does not depend on the resolution
        v.size = max(16, v.size // 2)
    return cfg


def _views(cfg, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, v.size, v.size, generator=g) for v in cfg.data.expanded_views()]


def _build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    method = build_method(cfg)
    method.train()
    return method


def _loss(method, cfg, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(1234)  # random draws inside the forward (group partitions, shuffles) are seeded alike
    return method(_views(cfg, seed), cfg.data.n_global, CTX).loss


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()} if module is not None else {}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_keeps_the_trainer_contract(name):
    cls, cfg = METHODS[name], _cfg(name)
    assert cls.eval_weights in ("student", "teacher")
    assert getattr(cls, "eval_protocol", None) in PROTOCOLS, f"{name}: eval_protocol must name a PROTOCOLS preset"

    # seeded determinism: two builds from one seed are identical, and so are their losses
    method, twin = _build(cfg, seed=7), _build(cfg, seed=7)
    state = copy.deepcopy(method.state_dict())
    assert state.keys() == twin.state_dict().keys()
    assert all(torch.equal(state[k], twin.state_dict()[k]) for k in state), f"{name}: seeded builds differ"
    loss = _loss(method, cfg)
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    with torch.no_grad():
        assert torch.equal(_loss(twin, cfg), loss.detach()), f"{name}: seeded losses differ"

    # state_dict round trip: a differently seeded instance that loads the state gives the same loss
    other = _build(cfg, seed=1)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(_loss(other, cfg), loss.detach()), f"{name}: state_dict round trip changed the loss"

    # gradients reach the student only
    loss.backward()
    student_ids = {id(p) for p in method.student.parameters()}
    stray = [n for n, p in method.named_parameters() if p.grad is not None and id(p) not in student_ids]
    assert not stray, f"{name}: gradients outside the student: {stray[:3]}"
    trainable = [p for p in method.student.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)

    # the teacher changes in after_step and nowhere else (not in forward, backward or the optimiser step)
    teacher_before = _params(method.teacher)
    torch.optim.SGD(trainable, lr=0.1).step()
    teacher_now = _params(method.teacher)
    assert all(torch.equal(teacher_before[n], teacher_now[n]) for n in teacher_before), f"{name}: teacher moved"
    out = method(_views(cfg, seed=1), cfg.data.n_global, CTX)
    method.after_step(out, CTX)
    if method.teacher is not None:
        moved = [n for n, p in _params(method.teacher).items() if not torch.equal(teacher_before[n], p)]
        assert moved, f"{name}: after_step did not update the teacher"


def test_every_registered_method_is_covered():
    assert len(METHODS) >= 7
    missing = [m for m in METHODS if not os.path.exists(os.path.join(ROOT, "configs", "exp", f"{m}_demo.yaml"))]
    assert not missing, f"methods without a demo recipe: {missing}"
