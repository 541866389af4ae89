"""Fixtures of the GPU check's correctness tests (``cuda`` marker; ``make gpu-check`` runs them on CUDA at ImageNet
shapes, its CPU self-test at tiny shapes with FLASHSSL_CHECK_DEVICE=cpu FLASHSSL_CHECK_TINY=1)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_check import child


@pytest.fixture
def dev() -> torch.device:
    return child.device()


@pytest.fixture
def tiny() -> bool:
    return child.tiny()


@pytest.fixture
def strict_fp32():
    """fp32 references without TF32 (cuDNN convolutions and cuBLAS matmuls), restored afterwards."""
    old = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = old[0]
    torch.set_float32_matmul_precision(old[1])
