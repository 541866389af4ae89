import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


_TORCH_THREADS = torch.get_num_threads()

#: Free disk the suite needs where it writes (pytest's temporary folders, the demo dataset under the repo). With
#: ``tmp_path_retention_policy = "failed"`` a passed test's folder is removed at once; the largest test writes about
#: 1.1 GiB (checkpoint resume). A disk that fills up mid-run turns into unrelated failures (seen in CI: a truncated
#: checkpoint copy, then ffcv's stock writer waiting forever), so a short disk stops the run first, with numbers.
MIN_FREE_GIB = 3.0


def pytest_sessionstart(session):
    import shutil
    import tempfile

    for folder in {tempfile.gettempdir(), ROOT}:
        free = shutil.disk_usage(folder).free / 2**30
        if free < MIN_FREE_GIB:
            pytest.exit(f"only {free:.1f} GiB free on the filesystem of {folder}; the test suite needs "
                        f"{MIN_FREE_GIB:.0f} GiB (free some space, or point TMPDIR at a larger disk)", returncode=1)


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests (the GPU check's correctness stages) need CUDA; the GPU check's CPU self-test runs them on
    the CPU at tiny shapes by setting FLASHSSL_CHECK_DEVICE=cpu (see benchmarks/gpu_check)."""
    if torch.cuda.is_available() or os.environ.get("FLASHSSL_CHECK_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by make gpu-check)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # every test starts with the session's torch thread count: a library that resizes the pool (ffcv 1.0.2 set it to
    # 1 at import, which ran the rest of the session single-threaded) cannot slow down the tests after it
    torch.manual_seed(0)
    torch.set_num_threads(_TORCH_THREADS)
    yield


@pytest.fixture
def one_torch_thread(_seed_and_threads):
    """One intra-op thread for a test of many tiny ops (small tensors, kymatio's scattering): extra threads only
    spin and contend on a shared, oversubscribed CPU. Use with ``pytest.mark.usefixtures("one_torch_thread")``."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_TORCH_THREADS)


def make_image_folder(root, classes=2, per_class=12, size=40, seed=0):
    """A tiny ImageFolder of random-colour JPEGs with a class-dependent pattern (for smoke/resume tests)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            img[:, c * 4 : c * 4 + 8] = 255 - 60 * c
            Image.fromarray(img).save(os.path.join(d, f"{i:03d}.jpg"), quality=90)
    return str(root)


TINY_OVERRIDES = [
    "model.backbone=resnet18",
    "ssl.out_dim=256", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
    "data.batch_size=8", "data.workers=0",
    "data.views=[{role: global, count: 2, size: 32, scale: [0.3, 1.0]}, {role: local, count: 2, size: 16}]",
    "optim.warmup_epochs=1", "train.tensorboard=false", "train.knn_at_end=false", "train.log_every=1",
]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_image_folder(str(root / "train"), per_class=12)
    make_image_folder(str(root / "val"), per_class=4, seed=1)
    return str(root)
