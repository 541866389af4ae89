"""The EMA teacher copy: frozen, and without the student's stochastic depth."""

from __future__ import annotations

import torch

from models.backbone import build_backbone
from models.config import ModelConfig
from models.ema import make_teacher


def test_teacher_of_vit_with_drop_path_is_deterministic_in_train_mode():
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", drop_path_rate=0.5)
    student = build_backbone(cfg)
    teacher = make_teacher(student).train()
    student.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    s1, s2 = student(x), student(x)
    assert not torch.allclose(s1, s2)  # the student keeps stochastic depth (the test could fail this way)
    t1, t2 = teacher(x), teacher(x)
    torch.testing.assert_close(t1, t2, rtol=0, atol=0)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(getattr(m, "drop_prob", 0) > 0 for m in student.modules())  # the copy did not alter the student
