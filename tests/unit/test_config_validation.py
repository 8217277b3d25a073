"""Every field of every config dataclass refuses bad values with a ConfigError naming it.

The cases are generated from the dataclasses themselves (type hint + ``spec`` of each field),
so a new field or a new config class is covered without editing this file: every class named
``*Config`` / ``*Options`` in the package is found by reading the source. Each bad value is
tried twice: through :func:`megamoe.config.from_dict` (the YAML path; the error must name the
dotted path) and by constructing the class directly (the error must name ``Class.field``).
The last tests feed the issue's examples through ``load_config`` and YAML files.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import os
import types
import typing

import pytest

from megamoe.config import ConfigError, Spec, field_spec, from_dict, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE_CFG = os.path.join(ROOT, "configs", "tiny_single.yaml")

# Config-like dataclasses whose names do not end in Config/Options.
EXTRA_CLASSES = [("megamoe.train.objectives", "ConsistencyObjective")]
# Fields for which every finite value (or every integer) is valid on purpose.
UNBOUNDED = {"SACConfig.target_entropy", "ConsistencyObjective.ignore_index"}
# Minimal values of required fields, per class (a new class with required fields must be added).
REQUIRED = {
    "ExpertConfig": {"intermediate_size": 8},
    "MoEConfig": {"hidden_size": 8, "num_experts": 2, "experts": {"intermediate_size": 8}},
}


def _config_classes() -> list[type]:
    found = list(EXTRA_CLASSES)
    for dirpath, _, files in os.walk(os.path.join(ROOT, "megamoe")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Options")) and any(
                        "dataclass" in ast.unparse(d) for d in node.decorator_list):
                    found.append((module, node.name))
    return [getattr(importlib.import_module(m), c) for m, c in sorted(set(found))]


CLASSES = _config_classes()


def _alts(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _seq_item(hint):
    import collections.abc
    if typing.get_origin(hint) in (collections.abc.Sequence, list, tuple):
        return typing.get_args(hint)[0]
    return None


def _is_mapping(hint) -> bool:
    import collections.abc
    return typing.get_origin(hint) in (collections.abc.Mapping, dict) or hint in (collections.abc.Mapping, dict)


def _numbers_out_of_bounds(sp: Spec, kind: type) -> list:
    step = 1 if kind is int else 0.5
    out = []
    if sp.ge is not None:
        out.append(sp.ge - step)
    if sp.gt is not None:
        out += [sp.gt, sp.gt - step]
    if sp.le is not None:
        out.append(sp.le + step)
    if sp.lt is not None:
        out.append(sp.lt)
    return [kind(v) if kind is int else float(v) for v in out]


def bad_values(hint, sp: Spec) -> list[tuple[object, str]]:
    """(value, why it is bad) for a field with this hint and Spec."""
    alts = _alts(hint)
    cases: list[tuple[object, str]] = []
    if type(None) not in alts:
        cases.append((None, "null where the field is not optional"))
    nums = [a for a in alts if a in (int, float)]
    if float in alts:
        cases += [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
    if int in alts and float not in alts:
        cases += [(1.5, "a float for an int"), (True, "a bool for an int")]
    if float in alts:
        cases.append((True, "a bool for a number"))
    if nums and (str not in alts or sp.choices):
        cases.append(("abc", "a non-numeric string"))
    for kind in nums:
        if sp.choices and any(type(c) is kind for c in sp.choices):
            cases.append((max(c for c in sp.choices if type(c) is kind) + 1, "not one of the choices"))
        else:
            cases += [(v, "out of range") for v in _numbers_out_of_bounds(sp, kind)]
    if bool in alts:
        cases += [("maybe", "a string for a bool"), ("yes-please", "a string for a bool"), (1, "an int for a bool")]
    if str in alts:
        if sp.choices and any(isinstance(c, str) for c in sp.choices):
            cases.append(("not-a-choice", "not one of the choices"))
        elif sp.nonempty:
            cases += [("", "an empty string"), ("  ", "a blank string")]
        if not nums and not any(_seq_item(a) for a in alts):
            cases.append((12, "a number for a string"))
    for alt in alts:
        item = _seq_item(alt)
        if item is None:
            continue
        if item is int:
            cases += [([1.5], "a float in a list of ints"), ([True], "a bool in a list of ints")]
            cases += [([v], "a list element out of range") for v in _numbers_out_of_bounds(sp, int)]
        elif item is str:
            cases.append(([3], "a number in a list of strings"))
        if sp.nonempty:
            cases.append(([], "an empty list"))
        if str not in alts:
            cases.append((5, "a number for a list"))
    if any(_is_mapping(a) for a in alts):
        cases += [(5, "a number for a mapping"), ([1], "a list for a mapping")]
    if any(dataclasses.is_dataclass(a) for a in alts):
        cases += [(5, "a number for a section"), ("x", "a string for a section"), ([1], "a list for a section")]
    return cases


def _cases():
    out = []
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            hint, sp = field_spec(cls, f.name)
            for value, why in bad_values(hint, sp):
                out.append(pytest.param(cls, f.name, value, id=f"{cls.__name__}.{f.name}={value!r} ({why})"))
    return out


CASES = _cases()


def _required(cls) -> dict:
    return dict(REQUIRED.get(cls.__name__, {}))


def _direct_kwargs(cls) -> dict:
    kw = _required(cls)
    if "experts" in kw and isinstance(kw["experts"], dict):
        from megamoe.config import ExpertConfig
        kw["experts"] = ExpertConfig(**kw["experts"])
    return kw


def test_the_generator_found_the_config_classes():
    names = {c.__name__ for c in CLASSES}
    assert {"RouterConfig", "ExpertConfig", "MoEConfig", "ModelConfig", "DataConfig", "LoopConfig", "ParallelConfig",
            "TrainConfig", "AuxFreeBalancingConfig", "CompeteOptions", "EstimatorOptions", "BalancedOptions",
            "ExpertChoiceOptions", "StochasticOptions", "SACConfig", "ConsistencyObjective"} <= names
    assert len(CASES) > 400


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_validates_and_round_trips(cls):
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required <= set(_required(cls)), f"add {cls.__name__}'s required fields to REQUIRED"
    cfg = from_dict(cls, _required(cls), where="sec")
    assert from_dict(cls, to_dict(cfg), where="sec") == cfg


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_numeric_field_declares_its_range(cls):
    for f in dataclasses.fields(cls):
        hint, sp = field_spec(cls, f.name)
        kinds = [a for alt in _alts(hint) for a in ([alt] if _seq_item(alt) is None else _alts(_seq_item(alt)))]
        if any(k in (int, float) for k in kinds) and f"{cls.__name__}.{f.name}" not in UNBOUNDED:
            assert sp.choices or any(b is not None for b in (sp.ge, sp.gt, sp.le, sp.lt)), \
                f"{cls.__name__}.{f.name}: declare its valid range with spec(ge=/gt=/le=/lt=/choices=)"


@pytest.mark.parametrize("cls, name, value", CASES)
def test_bad_value_is_a_config_error_naming_the_field(cls, name, value):
    hint, sp = field_spec(cls, name)
    with pytest.raises(ConfigError) as via_yaml:
        from_dict(cls, {**_required(cls), name: value}, where="sec")
    msg = str(via_yaml.value)
    assert f"sec.{name}=" in msg or f"sec.{name} is" in msg, msg
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            int in _alts(hint) or float in _alts(hint)) and not sp.choices:
        assert sp.bounds_text().strip() in msg, msg  # the allowed range is stated
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{name}[= ]"):
        cls(**{**_direct_kwargs(cls), name: value})


# ------------------------------------------------------------------ the issue's examples, end to end
@pytest.mark.parametrize("override, path", [
    ("train.lr=.inf", "train.lr=inf"), ("train.lr=.nan", "train.lr=nan"), ("train.lr=0", "train.lr=0"),
    ("train.grad_clip=.nan", "train.grad_clip=nan"), ("train.beta2=1", "train.beta2=1"),
    ("train.adam_eps=0", "train.adam_eps=0"), ("train.steps=2.5", "train.steps=2.5"),
    ("model.moe.router.aux_loss_coef=.nan", "model.moe.router.aux_loss_coef=nan"),
    ("model.moe.router.jitter_eps=.nan", "model.moe.router.jitter_eps=nan"),
    ("model.rms_norm_eps=-1", "model.rms_norm_eps=-1"), ("model.rope_theta=-5", "model.rope_theta=-5"),
    ("model.rope_theta=abc", "model.rope_theta='abc'"),
    ("model.moe.router.options.capacity_factor=.nan", "model.moe.router.options.capacity_factor=nan"),
    ("model.moe.router.options.capacity_factor=.inf", "model.moe.router.options.capacity_factor=inf"),
    ("model.initializer_range=-1", "model.initializer_range=-1"),
    ("model.num_kv_heads=-2", "model.num_kv_heads=-2"), ("model.num_kv_heads=0", "model.num_kv_heads=0"),
    ("model.head_dim=-16", "model.head_dim=-16"), ("model.dense_intermediate_size=-1",
                                                   "model.dense_intermediate_size=-1"),
    ("model.moe_layers=5", "model.moe_layers=5"), ("model.moe_layers=[0, 7]", "model.moe_layers=[0, 7]"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings='maybe'"),
    ("model.tie_embeddings=yes", "model.tie_embeddings='yes'"),
    ("model.gradient_checkpointing=yes-please", "model.gradient_checkpointing='yes-please'"),
    ("model.moe.router.options.x=1", "options"), ("model.moe.router.top_k=1.0", "model.moe.router.top_k=1.0"),
    ("data.eval_fraction=.nan", "data.eval_fraction=nan"), ("data.files=[3]", "data.files=[3]"),
    ("parallel.zero_stage=1.0", "parallel.zero_stage=1.0"), ("train.precision=null", "train.precision=None"),
    ("model=5", "model=5"), ("train=[1, 2]", "train=[1, 2]"), ("model.moe.router=null", "model.moe.router is empty"),
    ("deepspeed=5", "deepspeed=5"), ("balancing=[1]", "balancing=[1]"),
    ("balancing.step_size=.inf", "balancing.step_size=inf"),
])
def test_issue_examples_through_load_config(override, path):
    from megamoe.train.config import load_config
    with pytest.raises(ConfigError) as exc:
        load_config(SINGLE_CFG, [override])
    assert path in str(exc.value), str(exc.value)


@pytest.mark.parametrize("content, message", [
    (b"", r"holds no settings \(it is empty or only comments\).*leave out --config"),
    (b"# only a comment\n", r"holds no settings"),
    (b"model:\n  hidden_size: 64\n\xff\xfe\n", r"is not UTF-8 text \(byte \d+, line 3\)"),
    (b"- 1\n- 2\n", r"must hold a mapping of sections, got list"),
    (b"train: 5\n", r"train=5 is invalid: it must be a section \(a mapping of LoopConfig fields\)"),
    (b"train:\n", r"train is empty \(null\)"),
    (b"train:\n  steps: 3\n  steps: 4\n", r"found the key 'steps' twice \(first on line 2\)"),
    (b"model:\n  tie_embeddings: yes\n", r"model\.tie_embeddings='yes' is invalid: must be true or false"),
    (b"model: {hidden_size: 64\n", r"is not valid YAML"),
    (b"train:\n  lr: .inf\n", r"train\.lr=inf is invalid: must be a finite number > 0"),
])
def test_bad_config_files_are_named_errors(tmp_path, content, message):
    from megamoe.train.config import load_config
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(str(path))
    assert "cfg.yaml" in str(exc.value)


def test_good_values_still_load():
    from megamoe.train.config import load_config
    cfg = load_config(SINGLE_CFG, ["train.lr=1", "model.moe.router.options.eval_capacity_factor=dropless",
                                   "train.grad_clip=0",
                                   "model.moe_layers=[1]", "model.tie_embeddings=true", "data.files=a.txt",
                                   "model.moe.router.options.capacity_factor=2", "model.moe.router.options.drop_policy=position"])
    assert cfg.train.lr == 1 and cfg.model.moe_layers == [1] and cfg.model.tie_embeddings is True
