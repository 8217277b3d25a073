"""Multi-head latent attention (attention='mla') and DeepSeek-V3 conversion, tiny local configs.

The MLA decoder must compute what transformers' DeepseekV3ForCausalLM computes (fp32, max abs
logits diff <= 1e-5 on logits of magnitude ~5); a sigmoid model whose ALF-LB biases were set
by megamoe.routing.balancing converts to stock ``deepseek_v3`` with the bias as
``e_score_correction_bias`` and back, bit-exactly; what DeepSeek-V3 cannot express is refused.
"""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import ConfigError, ExpertConfig, MoEConfig, RouterConfig  # noqa: E402
from megamoe.checkpoint import load_consolidated, save_consolidated  # noqa: E402
from megamoe.checkpoint.hf_convert import (ConversionError, convert_from_hf, convert_to_hf,  # noqa: E402
                                           megamoe_to_hf)
from megamoe.model import OLD_MOE_FIELDS, ModelConfig, MoETransformerLM  # noqa: E402
from megamoe.routing.balancing import AuxFreeBalancingConfig  # noqa: E402
from megamoe.train.step_state import MoEStepState  # noqa: E402

MLA = dict(attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6)


def mla(**kw):
    base = dict(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_experts=4, max_seq_len=64,
                experts=ExpertConfig(intermediate_size=16),
                router=RouterConfig(top_k=2, aux_loss_coef=0.0, options={"score_func": "sigmoid"}), **MLA)
    base.update(kw)
    moe = {k: base.pop(k) for k in OLD_MOE_FIELDS if k in base}  # the MoE layer's fields
    return ModelConfig(**base, moe=MoEConfig(**moe))


def make(cfg, seed=0):
    torch.manual_seed(seed)
    m = MoETransformerLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a misplaced norm shows
    return m


def greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_logits_equal_hf_deepseek_v3_after_rename(q_lora_rank):
    # The HF model is configured here by hand (not by the converter), with rotate-half RoPE,
    # so this checks MLA itself: latent norms, shared rotary key, split sizes, softmax scale.
    cfg = mla(q_lora_rank=q_lora_rank, moe_layers=[1, 2], num_shared_experts=2,
              router=RouterConfig(top_k=2, aux_loss_coef=0.0,
                                  options={"score_func": "sigmoid", "routed_scaling_factor": 2.5}))
    ours = make(cfg)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=61, hidden_size=32, intermediate_size=cfg.dense_intermediate_size, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=4,
        num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=1, topk_group=1, first_k_dense_replace=1,
        norm_topk_prob=True, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=6, rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=64, num_mtp_layers=0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    sd = {k.replace(".mlp.router.weight", ".mlp.gate.weight").replace(".mlp.shared_expert.", ".mlp.shared_experts."): v
          for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(m.endswith("e_score_correction_bias") for m in missing), (missing, unexpected)
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1.0  # the comparison is not between near-zero logits


def test_mla_is_causal_and_trains_with_checkpointing():
    model = make(mla(gradient_checkpointing=True))
    ids = torch.randint(0, 61, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8] = (ids2[0, 8] + 1) % 61
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    # Earlier positions agree up to BLAS rounding (expert batches change shape); later ones move.
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2
    model.train()
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


def _alflb_biased(cfg):
    """A model whose selection biases were set by ALF-LB updates on a few training batches."""
    model = make(cfg)
    balancer = MoEStepState(model, balancing=AuxFreeBalancingConfig(update="sign", step_size=0.05))
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randint(0, 61, (4, 16), generator=gen))
            balancer.end_step()
    balancer.close()
    return model.eval(), balancer.balancer.biases()


def test_export_deepseek_v3_with_alflb_bias_roundtrip(tmp_path):
    cfg = mla(moe_layers=[1, 2], num_shared_experts=1, shared_intermediate_size=20,
              router=RouterConfig(top_k=2, aux_loss_coef=0.0,
                                  options={"score_func": "sigmoid", "routed_scaling_factor": 1.5}))
    model, biases = _alflb_biased(cfg)
    assert len(biases) == 2 and all(b.abs().max() > 0 for b in biases.values())
    save_consolidated(model, tmp_path / "mm")
    report = convert_to_hf(tmp_path / "mm", tmp_path / "hf")  # auto: MLA + sigmoid -> deepseek_v3
    assert report.format == "deepseek_v3" and report.max_abs_diff <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mm"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM" and hf.config.first_k_dense_replace == 1
    assert hf.config.rope_interleave and hf.config.routed_scaling_factor == 1.5
    for name, bias in biases.items():
        i = int(name.split(".")[2])
        assert torch.equal(hf.model.layers[i].mlp.gate.e_score_correction_bias, bias)
    ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, ref, rtol=0, atol=1e-5)
    prompt = ids[:1, :5]
    out = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(out, greedy(model, prompt, 8))

    # The bias matters: without it HF selects other experts, so the logits check above is meaningful.
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ref).abs().max() > 1e-2

    back = convert_from_hf(tmp_path / "hf", tmp_path / "back")
    assert back.max_abs_diff <= 1e-4
    restored = load_consolidated(tmp_path / "back")
    # The width-20 shared MLP was zero-padded to 2 x I = 32 for HF and is trimmed back to 20.
    assert restored.config == dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=2))
    ours, theirs = model.state_dict(), restored.state_dict()
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k


def _hf_deepseek(**kw):
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=8, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_mtp_layers=0)
    base.update(kw)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**base)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
        for layer in hf.model.layers[base["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return hf


@pytest.mark.parametrize("kw", [dict(), dict(n_group=2, topk_group=2, q_lora_rank=12)])
def test_import_stock_deepseek_v3_interleaved_rope(tmp_path, kw):
    # HF's default layout (rope_interleave=True) is imported by permuting rotary rows; n_group =
    # topk_group keeps every group, so it is the same function as ungrouped top-k.
    hf = _hf_deepseek(routed_scaling_factor=2.5, **kw)
    assert hf.config.rope_interleave
    report = convert_from_hf(hf, tmp_path / "mm")
    assert report.max_abs_diff <= 1e-4
    model = load_consolidated(tmp_path / "mm").eval()
    assert model.config.attention == "mla" and model.config.moe.router.options.routed_scaling_factor == 2.5
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_import_refuses_what_megamoe_cannot_compute(tmp_path):
    with pytest.raises(ConversionError, match="n_group=2, topk_group=1") as err:
        convert_from_hf(_hf_deepseek(n_group=2, topk_group=1, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}),
            tmp_path / "a")
    assert "rope_type='yarn'" in str(err.value)
    hf = _hf_deepseek(attention_bias=True)
    with pytest.raises(ConversionError, match="non-zero biases"):
        convert_from_hf(hf, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cfg, fmt, fragment", [
    (ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                 moe=MoEConfig(num_experts=4, experts=ExpertConfig(intermediate_size=16),
                               router=RouterConfig(top_k=2, options={"score_func": "sigmoid"}))),
     "deepseek_v3", "attention='gqa'"),
    (mla(), "glm4_moe", "attention='mla'"),
    (mla(), "mixtral", "attention='mla'"),
    (mla(router=RouterConfig(top_k=2)), "deepseek_v3", "score_func='softmax'"),
    (mla(moe_layers=[0, 2]), "deepseek_v3", "first_k_dense_replace"),
    (mla(num_shared_experts=1, shared_expert_gate=True), "deepseek_v3", "shared experts are ungated"),
    (mla(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0, "drop_policy": "position",
                                               "score_func": "sigmoid"})), "deepseek_v3", "dropless"),
    (mla(attention="gqa", q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=None, qk_rope_head_dim=None,
         v_head_dim=None, num_kv_heads=2, router=RouterConfig(top_k=2, options={"routed_scaling_factor": 2.0})),
     "mixtral", "routed_scaling_factor=2.0"),
])
def test_export_refusals_name_the_reason(tmp_path, cfg, fmt, fragment):
    with pytest.raises(ConversionError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        convert_to_hf(make(cfg), tmp_path / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_auto_writes_megamoe_class_for_mla_with_softmax_router(tmp_path):
    import megamoe.integrations.hf_model  # noqa: F401  (registers the Auto classes)

    model = make(mla(router=RouterConfig(top_k=2)))
    hf, report = megamoe_to_hf(model)
    assert report.format == "megamoe" and "score_func='softmax'" in report.notes[0]
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kw, fragment", [
    (dict(attention="mha"), "attention='mha'"),
    (dict(kv_lora_rank=None), "kv_lora_rank is required"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim=5"),
    (dict(q_lora_rank=0), "q_lora_rank=0"),
    (dict(num_kv_heads=2), "num_kv_heads=2 is invalid with attention='mla'"),
    (dict(attention="gqa"), "only used with attention='mla'"),
])
def test_mla_config_errors_name_the_field(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        mla(**kw)


def test_routed_scaling_factor():
    with pytest.raises(ConfigError, match="routed_scaling_factor=0"):
        RouterConfig(options={"routed_scaling_factor": 0})
    with pytest.raises(ConfigError, match="only the 'topk' router"):
        RouterConfig(name="expert_choice", options={"routed_scaling_factor": 2.0})
    from megamoe.routing import build_router
    x = torch.randn(10, 32)
    torch.manual_seed(0)
    plain = build_router(RouterConfig(top_k=2, options={"score_func": "sigmoid"}), hidden_size=32, num_experts=4)
    torch.manual_seed(0)
    scaled = build_router(RouterConfig(top_k=2, options={"score_func": "sigmoid", "routed_scaling_factor": 2.5}),
                          hidden_size=32, num_experts=4)
    a, b = plain(x), scaled(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    torch.testing.assert_close(b.weights_TK, 2.5 * a.weights_TK, rtol=0, atol=0)


def test_train_config_accepts_mla_fields():
    from megamoe.train.config import load_config

    cfg = load_config(None, ["model.attention=mla", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
                             "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.moe.router.options.score_func=sigmoid",
                             "model.moe.router.options.routed_scaling_factor=2.5"])
    assert cfg.model.attention == "mla" and cfg.model.q_lora_rank is None
    assert cfg.model.moe.router.options.routed_scaling_factor == 2.5
    with pytest.raises(ConfigError, match="qk_nope_head_dim is required"):
        load_config(None, ["model.attention=mla", "model.kv_lora_rank=16", "model.qk_rope_head_dim=4",
                           "model.v_head_dim=8"])
