"""Every numeric config field declares its allowed values, and random values of any field either fail with a
ConfigError naming the key or give a config whose every number is inside its declared range (property-based)."""

import dataclasses
import functools
import math
import tempfile
import typing
from typing import Literal, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Config, load_config
from evaluation.config import LinearConfig, load_linear_config
from methods import METHODS
from runtime.config_loader import ConfigError, Range, bounded, field_range, to_dict

# ------------------------------------------------------------------------------------------------ the field tree


def _leaf_types(tp) -> list:
    """The plain types inside a (possibly nested) type annotation: ``tuple[float, ...] | None`` -> [float, None]."""
    if get_origin(tp) is Literal:
        return []
    args = get_args(tp)
    return [t for a in args for t in _leaf_types(a)] if args else [tp]


def _is_numeric(tp) -> bool:
    return any(t in (int, float) for t in _leaf_types(tp))


def _fields(cls, prefix: str) -> list[tuple[str, dataclasses.Field, object]]:
    """(dotted key, field, type) of every leaf field under dataclass ``cls``; ``Config.ssl`` is left to callers."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = [t for t in _leaf_types(hints[f.name]) if dataclasses.is_dataclass(t)]
        if nested:
            view = "[0]" if get_origin(hints[f.name]) is list else ""
            out += [leaf for t in nested for leaf in _fields(t, f"{key}{view}.")]
        else:
            out.append((key, f, hints[f.name]))
    return out


def config_tree() -> dict[str, list[tuple[str, dataclasses.Field, object]]]:
    """Every user-facing config tree: ``train.py`` for each method (its ``ssl`` section typed by the method) and the
    ``eval.py linear`` probe config. New dataclasses nested anywhere in them are found automatically."""
    trees = {m: _fields(Config, "") + _fields(cls.Config, "ssl.") for m, cls in METHODS.items()}
    trees["linear"] = _fields(LinearConfig, "")
    return trees


def missing_ranges(fields) -> list[str]:
    return sorted({key for key, f, tp in fields if _is_numeric(tp) and field_range(f) is None})


# ------------------------------------------------------------------------------------------------ declarations


def test_every_numeric_field_declares_a_range():
    missing = sorted({k for fields in config_tree().values() for k in missing_ranges(fields)})
    assert not missing, ("numeric config fields without a declared range; declare one with "
                         f"runtime.config_loader.bounded(default, ge=..., ...): {missing}")


def test_the_range_check_catches_an_undeclared_field():
    @dataclasses.dataclass
    class Probe:
        good: int = bounded(1, ge=1)
        bad: float | None = None
        names: tuple[str, ...] = ()

    assert missing_ranges(_fields(Probe, "x.")) == ["x.bad"]


@pytest.mark.parametrize("tree", sorted(config_tree()))
def test_defaults_satisfy_their_ranges(tree):
    for key, f, _ in config_tree()[tree]:
        rng = field_range(f)
        if rng is not None:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rng.check(key, default)


@pytest.mark.parametrize("rng, good, bad, text", [
    (Range(ge=1), [1, 10**9], [0, -3, math.inf], ">= 1"),
    (Range(gt=0), [1e-12, 5.0], [0.0, -1.0, math.nan, math.inf], "> 0"),
    (Range(ge=0, lt=1), [0.0, 0.999], [1.0, -0.1], "in [0, 1)"),
    (Range(ge=8, also=(0,)), [0, 8, 500], [1, 7, -1], "0 or >= 8"),
    (Range(choices=(0, 1)), [0, 1], [2, -1], "one of 0, 1"),
])
def test_range_allows_and_describes(rng, good, bad, text):
    assert all(rng.allows(v) for v in good) and not any(rng.allows(v) for v in bad)
    assert rng.describe() == text
    with pytest.raises(ConfigError, match=r"^a\.b\[1\]: must be .*got"):
        rng.check("a.b", [good[0], bad[0]])


# ------------------------------------------------------------------------------------------------ random values

_CASES = [(tree, key, f) for tree, fields in sorted(config_tree().items()) for key, f, _ in fields]


def _boundary_values(f: dataclasses.Field) -> list:
    rng = field_range(f)
    if rng is None:
        return [0]
    edges = [*(rng.choices or ()), *rng.also] + [v for v in (rng.ge, rng.gt, rng.le, rng.lt) if v is not None]
    return [e + d for e in edges for d in (-1, -1e-9, 0, 1e-9, 1)]


@st.composite
def _assignment(draw):
    tree, key, f = draw(st.sampled_from(_CASES))
    scalar = st.one_of(st.sampled_from(_boundary_values(f)), st.integers(-2**40, 2**40), st.floats(),
                       st.booleans(), st.none(), st.text(max_size=4))
    value = draw(st.one_of(scalar, st.lists(scalar, max_size=3)))
    return tree, key, value


@functools.cache
def _default_views_of(method: str) -> str:
    return yaml.safe_dump(to_dict(load_config(method).data.views))


def _default_views(method: str) -> list[dict]:
    return yaml.safe_load(_default_views_of(method))


def _load(tree: str, key: str, value):
    """Load ``tree``'s config with ``key`` set to ``value``; view fields go into the first of two global views."""
    if key.startswith("data.views[0]."):
        views = _default_views(tree)
        views[0][key.rsplit(".", 1)[1]] = value
        override = "data.views=" + yaml.safe_dump(views, default_flow_style=True).strip()
    else:
        override = f"{key}={yaml.safe_dump(value, default_flow_style=True).removesuffix('...' + chr(10)).strip()}"
    if tree == "linear":
        return load_linear_config("dino", [], [override])
    return load_config(tree, [], [override])


def assert_in_ranges(obj, prefix: str = "") -> None:
    """Every numeric field of the dataclass tree ``obj`` is inside its declared range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if dataclasses.is_dataclass(item):
                assert_in_ranges(item, f"{prefix}{f.name}.")
        if field_range(f) is not None:
            field_range(f).check(f"{prefix}{f.name}", value)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_assignment())
def test_random_values_are_refused_by_name_or_valid(case):
    tree, key, value = case
    try:
        cfg = _load(tree, key, value)
    except ConfigError as e:
        leaf = key.rsplit(".", 1)[-1]
        assert leaf in str(e), (key, value, str(e))
        return
    assert_in_ranges(cfg)
    if tree != "linear":
        assert_in_ranges(cfg.ssl, "ssl.")


# ------------------------------------------------------------------------------------------------ one training step

#: fields whose every in-range value keeps the tiny DINO model tiny (sizes/dims are excluded on purpose)
_STEP_KEYS = ["optim.lr", "optim.min_lr", "optim.weight_decay", "optim.momentum", "optim.clip_grad",
              "optim.warmup_epochs", "train.seed", "ssl.student_temp", "ssl.teacher_temp", "ssl.center_momentum",
              "ssl.momentum_teacher", "data.views[0].flip_p", "data.views[0].hue", "data.views[0].blur_p",
              "data.views[0].solarize_p", "data.views[0].brightness"]


def _in_range(f: dataclasses.Field):
    rng = field_range(f)
    lo = rng.ge if rng.ge is not None else rng.gt if rng.gt is not None else 0.0
    hi = rng.le if rng.le is not None else rng.lt if rng.lt is not None else lo + 10.0
    if f.type in ("int", int):
        return st.integers(int(math.ceil(lo)), int(min(hi, lo + 1000)))
    return st.floats(lo, hi, exclude_min=rng.gt is not None, exclude_max=rng.lt is not None)


_FIELDS = {k: f for k, f, _ in config_tree()["dino"]}


@st.composite
def _valid_assignment(draw):
    keys = draw(st.lists(st.sampled_from(_STEP_KEYS), min_size=1, max_size=3, unique=True))
    return {k: draw(_in_range(_FIELDS[k])) for k in keys}


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_valid_assignment())
def test_valid_random_values_run_one_step(tiny_folder, values):
    from engine.trainer import Trainer
    from tests.conftest import TINY_OVERRIDES

    view = {k.rsplit(".", 1)[1]: v for k, v in values.items() if k.startswith("data.views")}
    views = [{"role": "global", "count": 1, "size": 32, **view}, {"role": "global", "size": 32}]
    overrides = [f"{k}={v!r}" for k, v in values.items() if not k.startswith("data.views")]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("dino", [], TINY_OVERRIDES + [
            "data.views=" + yaml.safe_dump(views, default_flow_style=True).strip(), "ssl.out_dim=32",
            "model.backbone=test_resnet",
            f"data.train_path={tiny_folder}/train", f"train.out_dir={out}", "train.epochs=1",
            "train.steps_per_epoch=1", "model.precision=fp32", *overrides])
        history = Trainer(cfg).fit().history
    assert [h["step"] for h in history] == [1] and math.isfinite(history[0]["loss"]), (values, history)


def test_view_ranges_name_the_view_index():
    with pytest.raises(ConfigError, match=r"data\.views\[1\]\.count: must be >= 1, got 0"):
        load_config("dino", [], ["data.views=[{role: global, count: 2}, {role: local, count: 0}]"])
    assert "data.views[0].count" in {k for k, _, _ in config_tree()["dino"]}
