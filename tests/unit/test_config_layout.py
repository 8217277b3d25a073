"""The config tree mirrors the modules (ModelConfig.moe, typed router options), and configs of the
older layout are read into it with one ConfigLayoutWarning naming what moved."""
import os
import warnings

import pytest
import yaml

from megamoe import ConfigError, ExpertConfig, MoEConfig, RouterConfig, TopKOptions, from_dict, to_dict
from megamoe.config import ConfigLayoutWarning
from megamoe.model import ModelConfig
from megamoe.routing.compete import CompeteOptions
from megamoe.routing.estimators import SkipOptions
from megamoe.routing.expert_choice import ExpertChoiceOptions
from megamoe.routing.stochastic import StochasticOptions
from megamoe.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE_CFG = os.path.join(ROOT, "configs", "tiny_single.yaml")


def test_each_router_gets_its_typed_options():
    assert RouterConfig().options == TopKOptions()
    assert RouterConfig(options={"score_func": "sigmoid"}).options == TopKOptions(score_func="sigmoid")
    assert isinstance(RouterConfig(name="expert_choice", top_k=1).options, ExpertChoiceOptions)
    assert isinstance(RouterConfig(name="skip", top_k=1).options, SkipOptions)
    assert isinstance(RouterConfig(name="stochastic", top_k=1).options, StochasticOptions)
    compete = RouterConfig(name="compete", options={"compete_prob": 0.5, "drop_policy": "position"})
    assert compete.options == CompeteOptions(compete_prob=0.5, drop_policy="position")
    with pytest.raises(ConfigError, match=r"RouterConfig\.options=TopKOptions\(.*\) is invalid: router 'skip' takes SkipOptions"):
        RouterConfig(name="skip", top_k=1, options=TopKOptions())
    # a top-k option at its "not used" value is ignored by routers without it; any other value is named
    assert RouterConfig(name="skip", top_k=1, options={"score_func": "softmax"}).options == SkipOptions()
    with pytest.raises(ConfigError, match="routed_scaling_factor=2.0 is invalid for router 'compete'"):
        RouterConfig(name="compete", options={"routed_scaling_factor": 2.0})
    with pytest.raises(ConfigError, match=r"options\.drop_policy='position' is invalid for router 'expert_choice': "
                                          r"it has no such option; remove it \(its options: capacity_factor, "):
        RouterConfig(name="expert_choice", top_k=1, options={"drop_policy": "position"})


def test_model_config_holds_the_moe_layer_config():
    cfg = ModelConfig(hidden_size=64, moe=MoEConfig(num_experts=4, experts=ExpertConfig(intermediate_size=32)))
    assert cfg.moe.hidden_size == 64  # the model's width, filled in
    assert set(to_dict(cfg)) & {"num_experts", "router", "experts"} == set()
    with pytest.raises(ConfigError, match=r"ModelConfig\.moe\.hidden_size=32 is invalid: it must equal"):
        ModelConfig(hidden_size=64, moe=MoEConfig(hidden_size=32, num_experts=4, experts=ExpertConfig(32)))
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current layout reads without a warning
        assert from_dict(ModelConfig, {"moe": {"num_experts": 2}}).moe.experts == ModelConfig().moe.experts


OLD_MODEL = {"hidden_size": 64, "num_heads": 4, "num_experts": 4, "experts": {"intermediate_size": 32},
             "router": {"name": "topk", "top_k": 1, "score_func": "sigmoid", "capacity_factor": 1.25,
                        "drop_policy": "position", "normalize_weights": True, "eval_capacity_factor": None,
                        "routed_scaling_factor": 1.0, "aux_loss_coef": 0.0, "options": {}},
             "num_shared_experts": 1, "shared_expert_gate": True}


def test_the_older_layout_is_read_with_one_warning_naming_what_moved():
    with pytest.warns(ConfigLayoutWarning) as record:
        cfg = from_dict(ModelConfig, OLD_MODEL, where="model")
    assert len(record) == 1
    msg = str(record[0].message)
    for old, new in [("model.num_experts", "model.moe.num_experts"), ("model.router", "model.moe.router"),
                     ("model.shared_expert_gate", "model.moe.shared_expert_gate"),
                     ("model.router.capacity_factor", "model.moe.router.options.capacity_factor")]:
        assert f"{old} -> {new}" in msg, msg
    new = ModelConfig(hidden_size=64, num_heads=4, moe=MoEConfig(
        num_experts=4, experts=ExpertConfig(intermediate_size=32), num_shared_experts=1, shared_expert_gate=True,
        router=RouterConfig(top_k=1, aux_loss_coef=0.0, options=TopKOptions(score_func="sigmoid", capacity_factor=1.25,
                                                                             drop_policy="position"))))
    assert cfg == new


def test_old_errors_keep_their_names_in_the_new_places():
    old = {**OLD_MODEL, "router": {"name": "expert_choice", "top_k": 1, "eval_capacity_factor": 2.0}}
    with pytest.warns(ConfigLayoutWarning), pytest.raises(
            ConfigError, match=r"model\.moe\.router\.options\.eval_capacity_factor=2\.0 is invalid for router "
                               r"'expert_choice'"):
        from_dict(ModelConfig, old, where="model")
    with pytest.warns(ConfigLayoutWarning), pytest.raises(
            ConfigError, match=r"model\.moe\.router\.options\.capacity_factor=inf is invalid: must be a finite"):
        from_dict(ModelConfig, {"router": {"capacity_factor": float("inf")}}, where="model")


def test_old_yaml_files_and_overrides_load_like_the_new_ones(tmp_path):
    raw = yaml.safe_load(open(SINGLE_CFG))
    moe = raw["model"].pop("moe")
    raw["model"].update(moe)  # the shipped config, written in the older layout
    old_file = tmp_path / "old.yaml"
    old_file.write_text(yaml.safe_dump(raw))
    with pytest.warns(ConfigLayoutWarning, match=r"model\.num_experts -> model\.moe\.num_experts"):
        assert load_config(str(old_file)) == load_config(SINGLE_CFG)
    # an override in the older spelling lands where the new key would (and wins over the file)
    with pytest.warns(ConfigLayoutWarning, match=r"model\.router\.capacity_factor -> "
                                                  r"model\.moe\.router\.options\.capacity_factor"):
        old = load_config(SINGLE_CFG, ["model.num_experts=4", "model.experts.intermediate_size=32",
                                       "model.router.capacity_factor=1.5", "model.router.drop_policy=position"])
    new = load_config(SINGLE_CFG, ["model.moe.num_experts=4", "model.moe.experts.intermediate_size=32",
                                   "model.moe.router.options.capacity_factor=1.5",
                                   "model.moe.router.options.drop_policy=position"])
    assert old == new and new.model.moe.experts.activation == "swiglu"
