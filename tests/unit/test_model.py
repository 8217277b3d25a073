"""The decoder LM: logits equal HF Mixtral's after a rename; causality; config errors."""
import pytest
import torch

from megamoe import ConfigError, ExpertConfig, MoEConfig, RouterConfig
from megamoe.model import OLD_MOE_FIELDS, ModelConfig, MoETransformerLM, count_parameters, rms_norm_backend
from megamoe.testing import assert_prefix_unchanged


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                experts=ExpertConfig(intermediate_size=48), router=RouterConfig(top_k=2, aux_loss_coef=0.0))
    base.update(kw)
    moe = {k: base.pop(k) for k in OLD_MOE_FIELDS if k in base}  # the MoE layer's fields
    return ModelConfig(**base, moe=MoEConfig(**moe))


def test_logits_match_hf_mixtral():
    transformers = pytest.importorskip("transformers")
    cfg = tiny()
    ours = MoETransformerLM(cfg).eval()
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    sd = {k.replace(".mlp.router.", ".mlp.gate."): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_causal_no_future_leak():
    model = MoETransformerLM(tiny()).eval()
    ids = torch.randint(0, 97, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8] = (ids2[0, 8] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    assert_prefix_unchanged(a[:, :8], b[:, :8], "logits before position 8")
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_loss_and_backward_with_checkpointing_equal_plain():
    torch.manual_seed(0)
    m1 = MoETransformerLM(tiny(router=RouterConfig(top_k=2, aux_loss_coef=0.01))).train()
    m2 = MoETransformerLM(tiny(router=RouterConfig(top_k=2, aux_loss_coef=0.01), gradient_checkpointing=True)).train()
    m2.load_state_dict(m1.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    l1, l2 = m1(ids, labels=ids).loss, m2(ids, labels=ids).loss
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_moe_layer_selection_and_dense_layers():
    m = MoETransformerLM(tiny(num_layers=4, moe_layers="every_other"))
    kinds = [type(layer.mlp).__name__ for layer in m.model.layers]
    assert kinds == ["DenseMLP", "MoELayer", "DenseMLP", "MoELayer"]
    m = MoETransformerLM(tiny(num_layers=3, moe_layers=[0, 2]))
    assert [type(layer.mlp).__name__ for layer in m.model.layers] == ["MoELayer", "DenseMLP", "MoELayer"]
    counts = count_parameters(m)
    assert counts["active"] < counts["total"]


@pytest.mark.parametrize("kw, field", [
    (dict(num_kv_heads=3), "num_kv_heads"), (dict(num_heads=5), "num_heads"), (dict(moe_layers="some"), "moe_layers"),
    (dict(moe_layers=[5]), "moe_layers"), (dict(vocab_size=0), "vocab_size"),
])
def test_config_errors(kw, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**kw)


def test_sequence_too_long_is_refused():
    m = MoETransformerLM(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_rms_norm_backend_selection():
    x = torch.randn(2, 4)
    assert rms_norm_backend(x) == "torch"
    # A CPU tensor never takes the apex path even when an apex kernel is available.
    assert rms_norm_backend(x, apex_fn=lambda *a: None) == "torch"


def test_causal_lm_refuses_probs_drops_unless_opted_in():
    with pytest.raises(ConfigError, match=r"drop_policy='probs' is not causal.*allow_noncausal_drops: true"):
        tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0}))
    with pytest.raises(ConfigError, match=r"eval_capacity_factor=1\.5"):  # dropless training, capacity in eval
        tiny(router=RouterConfig(top_k=2, options={"eval_capacity_factor": 1.5}))
    with pytest.raises(ConfigError, match="not causal"):  # compete is a top-k router too
        tiny(router=RouterConfig(name="compete", top_k=2, options={"capacity_factor": 1.0}))
    with pytest.raises(ConfigError, match="allow_noncausal_drops"):
        tiny(allow_noncausal_drops="yes")
    tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0}), allow_noncausal_drops=True)
    tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0, "drop_policy": "position"}))
    tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0, "eval_capacity_factor": "dropless",
                                               "drop_policy": "position"}))
    tiny(router=RouterConfig(top_k=2, options={"eval_capacity_factor": "dropless"}))
    tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0}), moe_layers="none")


def test_train_config_refuses_probs_drops_with_the_field_named():
    from megamoe.train.config import config_from_mapping
    data = {"model": {"moe": {"router": {"top_k": 2, "options": {"capacity_factor": 1.25}}}}}
    with pytest.raises(ConfigError, match=r"model\.moe\.router is invalid .* moe\.router\.options\.drop_policy: position"
                                          r".*model\.allow_noncausal_drops"):
        config_from_mapping(data)
    data["model"]["allow_noncausal_drops"] = True
    assert config_from_mapping(data).model.allow_noncausal_drops
    data["model"] = {"moe": {"router": {"name": "expert_choice", "top_k": 1, "options": {"eval_capacity_factor": 2.0}}}}
    with pytest.raises(ConfigError, match="eval_capacity_factor=2.0 is invalid for router 'expert_choice'"):
        config_from_mapping(data)
