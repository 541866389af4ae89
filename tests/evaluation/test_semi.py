"""eval.py semi: subsets (SimCLR lists, class-balanced draws), presets, fine-tuning, resume, DDP, the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.semi import finetune
from evaluation.semi_config import SEMI_PROTOCOLS, SemiConfig, load_semi_config
from evaluation.subset import draw_balanced, read_subset, subset_names, write_subset
from runtime.config_loader import ConfigError
from tests.dist_helpers import run_distributed
from tests.evaluation.conftest import TensorLoader, TensorSplit, save_tiny_checkpoint, separable_images


# ------------------------------------------------------------------ subsets
def test_balanced_draw_is_per_class_seeded_and_roundtrips(tmp_path):
    labels = np.repeat(np.arange(3), [50, 20, 7])
    a = draw_balanced(labels, 10, seed=0)
    assert np.bincount(labels[a]).tolist() == [5, 2, 1]  # round(n_c / 10), at least one image per class
    assert a == draw_balanced(labels, 10, seed=0) and a != draw_balanced(labels, 10, seed=1)
    # ImageFolder-like paths; file names 00000-00006 occur in every class -> written as class/file
    paths = [f"/d/c{c}/{i:05d}.jpg" for c, n in enumerate([50, 20, 7]) for i in range(n)]
    names = subset_names(paths, a)
    assert all(("/" in n) == (int(n[-9:-4]) < 20) for n in names)
    write_subset(str(tmp_path / "s.txt"), names)
    assert read_subset(str(tmp_path / "s.txt"), paths) == a


def test_simclr_style_names_match_by_file_name(tmp_path):
    paths = ["/in/train/n01440764/n01440764_10026.JPEG", "/in/train/n01440764/n01440764_7.JPEG",
             "/in/train/n09999999/n09999999_1.JPEG"]
    (tmp_path / "1percent.txt").write_text("n09999999_1.JPEG\n\n# comment\nn01440764_10026.JPEG\n")
    assert read_subset(str(tmp_path / "1percent.txt"), paths) == [0, 2]
    assert subset_names(paths, [0, 2]) == ["n01440764_10026.JPEG", "n09999999_1.JPEG"]


def test_subset_errors_name_the_problem(tmp_path):
    paths = ["/d/a/1.jpg", "/d/b/1.jpg", "/d/b/2.jpg"]
    bad = tmp_path / "bad.txt"
    bad.write_text("2.jpg\nnope_3.JPEG\n")
    with pytest.raises(ConfigError, match=r"1 of the 2 names in .*bad.txt match no image.*nope_3.JPEG"):
        read_subset(str(bad), paths)
    amb = tmp_path / "amb.txt"
    amb.write_text("1.jpg\n")
    with pytest.raises(ConfigError, match="several images.*class/file"):
        read_subset(str(amb), paths)
    (tmp_path / "fixed.txt").write_text("b/1.jpg\n")
    assert read_subset(str(tmp_path / "fixed.txt"), paths) == [1]
    with pytest.raises(ConfigError, match="cannot read"):
        read_subset(str(tmp_path / "missing.txt"), paths)


# ------------------------------------------------------------------ presets
def test_presets_auto_and_overrides():
    cw = load_semi_config("dino")  # methods without their own recipe: the CW-RGP / Barlow Twins command line
    assert (cw.protocol, cw.train_perc, cw.epochs, cw.lr_backbone, cw.lr_classifier, cw.weight_decay) == \
        ("cw_rgp-1pct", 1.0, 20, 0.005, 0.5, 0.0)
    intl = load_semi_config("intl", overrides=["train_perc=10"])
    assert intl.protocol == "intl-10pct" and intl.train_perc == 10
    assert intl.peak_lrs(512) == pytest.approx((0.008, 0.4))  # INTL scales both lrs by batch / 256
    assert intl.schedule == "step" and intl.milestones == (60, 80)  # never fires in 20 epochs: constant lr
    mv = load_semi_config("intl", overrides=["protocol=mvmr-1pct", "epochs=3"])
    assert (mv.optimizer, mv.lr_backbone, mv.lr_classifier, mv.batch_size, mv.epochs) == ("adam", 1e-4, 1e-4, 128, 3)
    assert set(SEMI_PROTOCOLS) == {f"{m}-{p}pct" for m in ("cw_rgp", "intl", "mvmr") for p in (1, 10)}
    with pytest.raises(ConfigError, match="unknown preset 'intl-5pct'"):
        load_semi_config("intl", overrides=["protocol=intl-5pct"])
    with pytest.raises(ConfigError, match="train_perc"):
        load_semi_config("intl", overrides=["train_perc=0"])
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        load_semi_config("intl", overrides=["lr=0.1"])


# ------------------------------------------------------------------ fine-tuning on synthetic data
class TinyNet(nn.Module):
    """A trainable "backbone" without BatchNorm (so 2 ranks can equal 1 process on the CPU): (B,3,4,4) -> (B,16)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x.flatten(1)))


def _cfg(**kw) -> SemiConfig:
    base = dict(protocol="cw_rgp-1pct", epochs=3, batch_size=16, lr_backbone=0.05, lr_classifier=0.5)
    return SemiConfig(**{**base, **kw})


def _run(cfg, loader, split, state_path=None, seed=0):
    torch.manual_seed(seed)
    net = TinyNet()
    res = finetune(net, 4, loader, split, cfg, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3,
                   eval_batch_size=7, state_path=state_path, resume_key="k")
    return net, res


def test_finetune_learns_and_trains_the_backbone():
    x, y = separable_images(96)
    vx, vy = separable_images(40, noise=20.0)  # same class means, other noise level
    torch.manual_seed(0)
    before = TinyNet().state_dict()
    net, res = _run(_cfg(), TensorLoader(x, y, 16), TensorSplit(vx, vy))
    assert res["best"]["top1"] > 90 and len(res["epochs"]) == 3
    assert not torch.equal(net.fc.weight, before["fc.weight"])  # the backbone is fine-tuned
    frozen, _ = _run(_cfg(lr_backbone=0.0), TensorLoader(x, y, 16), TensorSplit(vx, vy))
    assert torch.equal(frozen.fc.weight, before["fc.weight"])  # lr_backbone 0: only the classifier moves


class _DiesAtEpoch(TensorLoader):
    def epoch_iter(self, epoch: int):
        if epoch == 2:
            raise KeyboardInterrupt
        return super().epoch_iter(epoch)


def test_resume_continues_exactly(tmp_path):
    x, y = separable_images(64)
    vx, vy = separable_images(20, noise=300.0)
    full_net, full = _run(_cfg(), TensorLoader(x, y, 16), TensorSplit(vx, vy))
    state = str(tmp_path / "semi.state.pt")
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(), _DiesAtEpoch(x, y, 16), TensorSplit(vx, vy), state)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    net, res = _run(_cfg(), TensorLoader(x, y, 16), TensorSplit(vx, vy), state, seed=123)  # other init: overwritten
    assert [r["train_loss"] for r in res["epochs"]] == [r["train_loss"] for r in full["epochs"]]
    for (n, a), b in zip(full_net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), n


def _finetune_on_ranks(rank, world, tmpdir):
    x, y = separable_images(96)
    vx, vy = separable_images(31, noise=300.0)  # 31: uneven validation shards
    net, res = _run(_cfg(epochs=2), TensorLoader(x, y, 16 // world, rank, world), TensorSplit(vx, vy))
    return net.state_dict(), res


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_equal_one_process():
    single_state, single = _finetune_on_ranks(0, 1, None)
    assert 30 < single["last"]["top1"] < 100
    for state, res in run_distributed(_finetune_on_ranks, 2):
        for a, b in zip(res["epochs"], single["epochs"]):
            assert a["top1"] == pytest.approx(b["top1"]) and a["top5"] == pytest.approx(b["top5"])
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for n, v in state.items():
            torch.testing.assert_close(v, single_state[n], rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------ the command line
def _semi(ckpt, data, val, tmp_path, *extra):
    from eval import main

    out = str(tmp_path / "semi.json")
    rc = main(["semi", "--checkpoint", ckpt, "--data", data, "--val-data", val, "--out", out, "--epochs", "1",
               "--batch-size", "4", "--device", "cpu", *extra])
    return rc, out


@pytest.mark.slow
def test_cli_draws_writes_and_reuses_the_subset(tiny_folder, tiny_ckpt, tmp_path):
    train, val = os.path.join(tiny_folder, "train"), os.path.join(tiny_folder, "val")
    rc, out = _semi(tiny_ckpt, train, val, tmp_path, "--train-perc", "50")
    assert rc == 0
    res = json.load(open(out))
    assert res["kind"] == "semi_eval" and res["subset_images"] == 12 and res["train_images"] == 24
    assert 0 <= res["last"]["top1"] <= 100 and res["last"]["top5"] == 100.0  # 2 classes: top-5 is trivial
    names = open(res["subset_file"]).read().split()
    assert len(names) == 12 and all(n.split("/")[0] in ("class0", "class1") for n in names)
    # the written list is a valid --subset file; a different subset gets its own results name
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(res["subset_file"], again / "mine.txt")
    rc, out2 = _semi(tiny_ckpt, train, val, again, "--subset", str(again / "mine.txt"), "--random-init")
    res2 = json.load(open(out2))
    assert rc == 0 and res2["subset_images"] == 12 and res2["init"] == "random"


@pytest.mark.slow
def test_cli_errors_exit_2(tiny_folder, tiny_ckpt, tiny_betons, tmp_path, capsys):
    train, val = os.path.join(tiny_folder, "train"), os.path.join(tiny_folder, "val")
    (tmp_path / "bad.txt").write_text("n01440764_10026.JPEG\n")
    rc, _ = _semi(tiny_ckpt, train, val, tmp_path, "--subset", str(tmp_path / "bad.txt"))
    assert rc == 2 and "n01440764_10026.JPEG" in capsys.readouterr().err
    rc, _ = _semi(tiny_ckpt, tiny_betons[0], tiny_betons[1], tmp_path, "--subset", str(tmp_path / "bad.txt"))
    assert rc == 2 and "samples.tsv" in capsys.readouterr().err  # a .beton without its record of source files
    rc, _ = _semi(tiny_ckpt, train, val, tmp_path, "--protocol", "nope")
    assert rc == 2 and "unknown preset" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_beton_subset_matches_its_samples_tsv(tiny_folder, tiny_betons, tmp_path):
    """A .beton's subset names are read from the samples.tsv convert_dataset.py writes next to it."""
    from torchvision.datasets import ImageFolder

    beton_dir = tmp_path / "b"
    beton_dir.mkdir()
    train, val = (shutil.copy(p, beton_dir) for p in tiny_betons)
    folder = ImageFolder(os.path.join(tiny_folder, "train"))
    rel = [os.path.relpath(p, os.path.join(tiny_folder, "train")) for p, _ in folder.samples]
    with open(os.path.splitext(train)[0] + ".samples.tsv", "w") as f:
        f.write("index\tlabel\tpath\n" + "".join(f"{i}\t{lab}\t{p}\n" for i, (p, (_, lab)) in
                                                 enumerate(zip(rel, folder.samples))))
    (tmp_path / "list.txt").write_text("\n".join(rel[:4] + rel[-4:]) + "\n")
    ckpt = save_tiny_checkpoint(str(tmp_path / "ckpt_step00000003.pt"), overrides=["data.loader=ffcv"])
    rc, out = _semi(ckpt, train, val, tmp_path, "--subset", str(tmp_path / "list.txt"))
    assert rc == 0 and json.load(open(out))["subset_images"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "beton"])
def test_probe_loader_reads_only_the_subset(kind, tiny_folder, tiny_betons):
    from evaluation.eval_loaders import build_probe_train_loader

    path = os.path.join(tiny_folder, "train") if kind == "folder" else tiny_betons[0]
    subset = [1, 4, 5, 13, 20, 23]
    loader = build_probe_train_loader(path, size=16, scale=(0.5, 1.0), interpolation="bilinear", batch_size=3,
                                      workers=0, seed=0, rank=0, world_size=1, mean=(0.5,) * 3, std=(0.5,) * 3,
                                      indices=subset)
    assert len(loader) == 2
    for epoch in (0, 1):
        seen = torch.cat([b.indices for b in loader.epoch_iter(epoch)]).tolist()
        assert sorted(seen) == subset  # dataset indices, each subset image once per epoch
        labels = torch.cat([b.labels for b in loader.epoch_iter(epoch)]).tolist()
        assert labels == [int(i >= 12) for i in seen]  # tiny folder: images 0-11 class 0, 12-23 class 1
