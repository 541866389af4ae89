"""Config: merge order, overrides, and every kind of bad input failing with a message naming the key."""

import pytest

from engine.config import load_config
from runtime.config_loader import ConfigError


def _yaml(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_merge_order_defaults_method_experiment_cli(tmp_path):
    default = load_config("dino")
    assert default.optim.lr == 0.1  # configs/method/dino.yaml
    assert default.ssl.out_dim == 65536 and default.data.n_global == 2 and default.data.n_local == 8
    a = _yaml(tmp_path, "a.yaml", "optim:\n  lr: 0.5\n  momentum: 0.8\nssl:\n  out_dim: 1024\n")
    b = _yaml(tmp_path, "b.yaml", "optim:\n  lr: 0.7\n")
    cfg = load_config("dino", [a, b], ["optim.momentum=0.95", "train.epochs=3"])
    assert cfg.optim.lr == 0.7  # later experiment file wins over earlier
    assert cfg.optim.momentum == 0.95  # CLI wins over files
    assert cfg.ssl.out_dim == 1024 and cfg.train.epochs == 3
    assert cfg.optim.weight_decay == 1e-4  # untouched keys keep the method default


def test_views_expand_and_lists_override(tmp_path):
    views = "data.views=[{role: global, count: 2, size: 64}, {role: local, count: 3, size: 32}]"
    cfg = load_config("dino", [], [views])
    sizes = [v.size for v in cfg.data.expanded_views()]
    assert sizes == [64, 64, 32, 32, 32]


def test_augment_switches_hold_for_every_view():
    cfg = load_config("dino", [], ["data.augment.jitter_impl=fused", "data.augment.cpu_impl=torch"])
    assert (cfg.data.augment.jitter_impl, cfg.data.augment.cpu_impl) == ("fused", "torch")
    assert load_config("dino").data.augment.jitter_impl == "exact"  # the reference path by default


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads '1e-5' as a string; a float field must still take it
    cfg = load_config("dino", [], ["optim.min_lr=1e-5", "optim.lr=2E-3"])
    assert cfg.optim.min_lr == 1e-5 and cfg.optim.lr == 2e-3


@pytest.mark.parametrize(
    "override, needles",
    [
        ("optim.lrr=0.1", ["optim", "lrr", "lr"]),  # unknown key, known keys listed
        ("optim.lr=fast", ["optim.lr", "fast"]),  # wrong type
        ("optim.name=rmsprop", ["optim.name", "rmsprop", "'sgd'", "'lars'", "'adamw'"]),  # invalid choice
        ("model.precision=fp8", ["model.precision", "fp8", "'bf16'"]),
        ("data.batch_size=0", ["data.batch_size", "0"]),
        ("ssl.student_temp=-1", ["ssl.student_temp", "-1"]),
        ("ssl.nope=1", ["ssl", "nope"]),
        ("train.epochs=1.5", ["train.epochs", "1.5"]),
        ("data.views=[{role: local, size: 32}, {role: global}]", ["data.views", "global"]),
        ("data.views=[{role: global, scale: [0.5, 0.2]}]", ["scale", "0.5"]),
        ("model.channels_last=maybe", ["model.channels_last", "maybe"]),
        ("data.augment.cpu_impl=numba", ["data.augment.cpu_impl", "numba", "'kernel'", "'torch'"]),
        # implementation switches are per run, not per view: the old per-view key names its replacement
        ("data.views=[{role: global, jitter_impl: fused}]", ["data.views[0].jitter_impl", "data.augment.jitter_impl"]),
        ("data.views=[{role: global, cpu_impl: torch}]", ["data.views[0].cpu_impl", "data.augment.cpu_impl"]),
        ("noequals", ["noequals", "key=value"]),
    ],
)
def test_bad_input_names_key_and_value(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config("dino", [], [override])
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_unknown_method_lists_allowed():
    with pytest.raises(ConfigError, match="unknown method 'simclr'.*dino"):
        load_config("simclr")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        load_config("dino", [str(tmp_path / "missing.yaml")])
    bad = _yaml(tmp_path, "bad.yaml", "optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config("dino", [bad])
    lst = _yaml(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must contain a mapping"):
        load_config("dino", [lst])
    other = _yaml(tmp_path, "other.yaml", "method: ressl\n")
    with pytest.raises(ConfigError, match="'ressl' but --method is 'dino'"):
        load_config("dino", [other])


def test_train_cli_reports_config_error_without_traceback(capsys):
    import train

    rc = train.main(["--method", "dino", "optim.name=rmsprop"])
    err = capsys.readouterr().err
    assert rc == 2 and "optim.name" in err and "Traceback" not in err


def test_config_saved_before_the_augment_section_still_loads():
    """Checkpoints of older runs hold jitter_impl / cpu_impl inside each view; they load into data.augment."""
    from engine.config import config_from_dict, config_to_dict

    saved = config_to_dict(load_config("dino"))
    del saved["data"]["augment"]
    for view in saved["data"]["views"]:
        view["jitter_impl"], view["cpu_impl"] = "fused", "torch"
    cfg = config_from_dict(saved)
    assert (cfg.data.augment.jitter_impl, cfg.data.augment.cpu_impl) == ("fused", "torch")
    assert config_to_dict(cfg)["data"]["views"] == config_to_dict(load_config("dino"))["data"]["views"]


def test_learning_run_config_points_the_recipe_at_the_data_in_fp32(tmp_path):
    from benchmarks.learning import learning_config

    cfg = learning_config("resa", "small", str(tmp_path), str(tmp_path / "run"), epochs=2, batch_size=32,
                          overrides=["ssl.temperature=0.3"])
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.ssl.temperature, cfg.model.precision) == (2, 32, 0.3, "fp32")
    assert cfg.data.train_path == f"{tmp_path}/train" and cfg.data.loader == "torchvision"
    default = learning_config("resa", "small", str(tmp_path), str(tmp_path / "run"))
    check = load_config("resa", ["configs/exp/resa_small.yaml"]).check
    assert (default.train.epochs, default.data.batch_size) == (check.epochs, check.batch_size) != (0, 0)
