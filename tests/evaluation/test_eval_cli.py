"""eval.py end to end on a tiny checkpoint, for both storage formats (ImageFolder directories and .beton files):
kNN, standard linear probe, fast probe (cache reuse), and clear exit-code-2 errors for bad inputs."""

import json
import os
import shutil

import pytest

import eval as eval_cli
from runtime.checkpoint import atomic_save, load_checkpoint
from tests.conftest import make_image_folder

# ffcv compiles a numba dispatcher per Loader; numba's finaliser of a collected one can raise a harmless KeyError
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module", params=["folder", "beton"])
def splits(request, tiny_folder, tiny_betons):
    if request.param == "folder":
        return request.param, os.path.join(tiny_folder, "train"), os.path.join(tiny_folder, "val")
    return request.param, *tiny_betons


def _run(args, capsys):
    rc = eval_cli.main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.slow
def test_knn_linear_fast(splits, tiny_ckpt, tmp_path, capsys):
    kind, train, val = splits
    cache = str(tmp_path / "cache")
    base = ["--checkpoint", tiny_ckpt, "--data", train, "--val-data", val]
    rc, out, err = _run(["knn", *base, "--k", "5", "20", "--cache-dir", cache, "--out", str(tmp_path / "knn.json")],
                        capsys)
    assert rc == 0, err
    knn = json.loads((tmp_path / "knn.json").read_text())["pretrained"]
    assert set(knn) >= {"k5", "k20", "seconds"} and 0 <= knn["k20"]["top1"] <= 100

    rc, out, err = _run(["linear", *base, "--out", str(tmp_path / "lin.json"), "epochs=2", "batch_size=8",
                         "eval_every=1"], capsys)
    assert rc == 0, err
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert [r["epoch"] for r in lin["epochs"]] == [0, 1] and lin["num_classes"] == 2 and lin["train_images"] == 24
    assert lin["global_batch"] == 8 and lin["feature_dim"] == 512 and "best" in out
    assert (tmp_path / "lin.state.pt").exists()

    rc, out, err = _run(["linear", "--fast", *base, "--cache-dir", cache, "--out", str(tmp_path / "fast.json"),
                         "fast.copies=1", "fast.epochs=5", "fast.lr_grid=[1,10]"], capsys)
    assert rc == 0, err
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert fast["train_features"] == 24 + 16  # center crops + one augmented copy (2 full batches of 8)
    assert len(fast["cache_hits"]) == 2  # the center-crop train/val features came from the kNN run
    assert set(fast["heads"]) == {"lr_x1", "lr_x10"} and 0 <= fast["best"]["top1"] <= 100


def test_bad_inputs_exit_2_with_a_clear_message(tiny_ckpt, tiny_folder, tmp_path, capsys):
    train, val = os.path.join(tiny_folder, "train"), os.path.join(tiny_folder, "val")
    cases = []
    cases.append((["linear", "--checkpoint", tiny_ckpt, "--data", str(tmp_path / "nope"), "--val-data", val],
                  str(tmp_path / "nope")))
    three = make_image_folder(str(tmp_path / "three"), classes=3, per_class=2)
    cases.append((["linear", "--fast", "--checkpoint", tiny_ckpt, "--data", train, "--val-data", three], "class"))
    cases.append((["linear", "--checkpoint", tiny_ckpt, "--data", train, "--val-data", val, "--num-classes", "5"],
                  "--num-classes 5"))
    cases.append((["linear", "--checkpoint", tiny_ckpt, "--data", train, "--val-data", val, "lr_typo=1"], "lr_typo"))
    cases.append((["knn", "--checkpoint", str(tmp_path / "missing.pt"), "--data", train, "--val-data", val],
                  "missing.pt"))
    not_beton = tmp_path / "x.beton"
    not_beton.write_bytes(b"garbage")
    cases.append((["knn", "--checkpoint", tiny_ckpt, "--data", str(not_beton), "--val-data", val], "x.beton"))
    state = load_checkpoint(tiny_ckpt)
    other = dict(state, meta={**state["meta"], "backbone": "resnet50"})  # from another architecture
    atomic_save(other, str(tmp_path / "other.pt"))
    cases.append((["export", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o.safetensors")],
                  "resnet50"))
    missing = dict(state, model={k: v for k, v in state["model"].items() if "layer4.0.conv1" not in k})
    atomic_save(missing, str(tmp_path / "missing_key.pt"))
    out = str(tmp_path / "m.safetensors")
    cases.append((["export", "--checkpoint", str(tmp_path / "missing_key.pt"), "--out", out], "layer4.0.conv1"))
    for args, needle in cases:
        rc, _, err = _run(args, capsys)
        assert rc == 2 and needle in err and "Traceback" not in err, (args, err)


def test_cache_is_invalidated_by_a_new_checkpoint(tiny_ckpt, tiny_folder, tmp_path, capsys):
    ckpt = str(tmp_path / "run" / "ckpt_step00000003.pt")
    os.makedirs(os.path.dirname(ckpt))
    shutil.copy(tiny_ckpt, ckpt)
    args = ["knn", "--checkpoint", os.path.dirname(ckpt), "--data", os.path.join(tiny_folder, "val"),
            "--val-data", os.path.join(tiny_folder, "val"), "--k", "3"]
    assert _run(args, capsys)[0] == 0
    assert "reusing" in _run(args, capsys)[1]
    state = load_checkpoint(ckpt)
    state["step"] = 4
    atomic_save(state, ckpt)  # re-saved checkpoint: the cached features must not be used
    rc, out, _ = _run(args, capsys)
    assert rc == 0 and "reusing" not in out and "wrote" in out
