"""Every bad config value fails at construction with an error naming the field."""
import pytest

from megamoe import (ConfigError, ExpertConfig, MoEConfig, MoELayer, RouterConfig, from_dict, known_routers,
                     register_router)


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=0), "top_k"),
    (dict(options={"score_func": "relu"}), "options.score_func"),
    (dict(options={"drop_policy": "random"}), "options.drop_policy"),
    (dict(options={"capacity_factor": 0}), "options.capacity_factor"),
    (dict(options={"capacity_factor": -1.5}), "options.capacity_factor"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(z_loss_coef=-1), "z_loss_coef"),
    (dict(jitter_eps=1.5), "jitter_eps"),
    (dict(options=[1, 2]), "options"),
])
def test_router_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"RouterConfig\.{field}="):
        RouterConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(intermediate_size=8, activation="tanh"), "activation"),
    (dict(intermediate_size=8, impl="cuda"), "impl"),
])
def test_expert_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=rf"ExpertConfig\.{field}="):
        ExpertConfig(**kwargs)


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError, match="'softmax', 'sigmoid'"):
        RouterConfig(options={"score_func": "tanh"})


def test_top_k_larger_than_num_experts():
    with pytest.raises(ConfigError, match=r"top_k=3 .*num_experts=2"):
        MoEConfig(hidden_size=8, num_experts=2, experts=ExpertConfig(8), router=RouterConfig(top_k=3))


def test_unknown_router_lists_known_ones():
    cfg = MoEConfig(hidden_size=8, num_experts=2, experts=ExpertConfig(8), router=RouterConfig(name="nope", top_k=1))
    with pytest.raises(ConfigError, match=r"unknown router; known routers are .*'topk'"):
        MoELayer(cfg)
    assert "topk" in known_routers()


def test_a_router_without_options_takes_none():
    from megamoe.routing.topk import TopKRouter

    @register_router("test_plain_topk")  # registers no options dataclass
    class PlainTopK(TopKRouter):
        pass

    with pytest.raises(ConfigError, match="takes no options"):
        RouterConfig(name="test_plain_topk", top_k=1, options={"x": 1})
    with pytest.raises(ConfigError, match=r"unknown config key 'RouterConfig.options.x'"):  # topk has options
        RouterConfig(top_k=1, options={"x": 1})


def test_hidden_size_mismatch_at_forward():
    import torch
    layer = MoELayer(MoEConfig(hidden_size=8, num_experts=2, experts=ExpertConfig(8), router=RouterConfig(top_k=1)))
    with pytest.raises(ValueError, match="hidden_size=8"):
        layer(torch.randn(3, 7))


def test_from_dict_nested_and_did_you_mean():
    cfg = from_dict(MoEConfig, {"hidden_size": 16, "num_experts": 4, "experts": {"intermediate_size": 32},
                                "router": {"top_k": 1, "options": {"score_func": "sigmoid"}}})
    assert cfg.router.options.score_func == "sigmoid" and cfg.experts.intermediate_size == 32
    with pytest.raises(ConfigError, match=r"unknown config key 'router.topk' \(did you mean 'top_k'\?\)"):
        from_dict(MoEConfig, {"hidden_size": 16, "num_experts": 4, "experts": {"intermediate_size": 32},
                              "router": {"topk": 1}})
    with pytest.raises(ConfigError, match="missing required keys"):
        from_dict(MoEConfig, {"hidden_size": 16, "experts": {"intermediate_size": 32}})


@pytest.mark.parametrize("value", [True, 2.5, "4"])
def test_integer_fields_reject_non_integers(value):
    with pytest.raises(ConfigError, match="num_experts"):
        MoEConfig(hidden_size=8, num_experts=value, experts=ExpertConfig(8))
