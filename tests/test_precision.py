"""model.precision=auto: bf16 only where the CPU runs it on AMX (elsewhere bf16 autocast is slower than fp32 and made
the suite ~20x slower on a CI machine without AMX), and the run records the value it used."""

import torch
import yaml

from engine import setup
from engine.config import load_config
from engine.trainer import Trainer
from tests.conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


def test_auto_follows_amx_and_the_onednn_isa_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert setup.resolve_precision("auto", CPU) == "bf16"
    assert setup.autocast_dtype("auto", CPU) is torch.bfloat16
    for cap in ("AVX2", "avx512_core_bf16", "AVX512_CORE"):  # oneDNN may not use AMX under these caps
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert setup.resolve_precision("auto", CPU) == "fp32", cap
        assert setup.autocast_dtype("auto", CPU) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert setup.resolve_precision("auto", CPU) == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert setup.resolve_precision("auto", CPU) == "fp32"


def test_explicit_choice_is_kept_and_slow_bf16_is_warned(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the AMX answer below must not be capped by the caller
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    said = []
    monkeypatch.setattr(setup, "log", said.append)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert setup.resolve_precision("fp32", CPU) == "fp32" and said == []
    assert setup.resolve_precision("bf16", CPU) == "bf16"
    assert len(said) == 1 and "model.precision=bf16" in said[0] and "auto" in said[0]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert setup.resolve_precision("bf16", CPU) == "bf16" and len(said) == 1


def test_trainer_records_the_resolved_precision(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cfg = load_config("dino", [], TINY_OVERRIDES + [f"data.train_path={tiny_folder}/train",
                                                    f"train.out_dir={tmp_path}"])
    assert cfg.model.precision == "auto"
    trainer = Trainer(cfg)
    assert trainer.cfg.model.precision == "fp32"
    with open(tmp_path / "config.yaml") as f:
        assert yaml.safe_load(f)["model"]["precision"] == "fp32"
