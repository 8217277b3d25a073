"""megamoe <-> Hugging Face checkpoint conversion on tiny local configs (no hub access).

Each case converts a megamoe model with non-trivial weights to the format ``auto`` picks,
reloads it with stock ``AutoModelForCausalLM.from_pretrained``, compares logits and greedy
generation with megamoe's own, then converts back and compares the weights.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import ConfigError, ExpertConfig, MoEConfig, RouterConfig  # noqa: E402
from megamoe.checkpoint import is_consolidated_dir, load_consolidated, save_consolidated  # noqa: E402
from megamoe.stats import moe_layers  # noqa: E402
from megamoe.checkpoint.hf_convert import (ConversionError, convert_from_hf, convert_to_hf,  # noqa: E402
                                           hf_to_megamoe, megamoe_to_hf)
from megamoe.model import OLD_MOE_FIELDS, ModelConfig, MoETransformerLM  # noqa: E402


def tiny(**kw):
    base = dict(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=4,
                max_seq_len=64, experts=ExpertConfig(intermediate_size=16), router=RouterConfig(top_k=2))
    base.update(kw)
    moe = {k: base.pop(k) for k in OLD_MOE_FIELDS if k in base}  # the MoE layer's fields
    return ModelConfig(**base, moe=MoEConfig(**moe))


def make(cfg, *, bias=False):
    """A model with weights large enough that routing and logits are far from uniform."""
    m = MoETransformerLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        if bias:
            for layer in moe_layers(m):
                layer.router.enable_selection_bias().copy_(torch.randn(cfg.moe.num_experts) * 0.3)
    return m


def greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


CASES = {
    "mixtral": (tiny(), False, "mixtral"),
    "qwen2_moe_gated_shared_dense": (tiny(num_shared_experts=1, shared_expert_gate=True, moe_layers="every_other"),
                                     False, "qwen2_moe"),
    "qwen2_moe_ungated_shared_unnormalised": (
        tiny(num_shared_experts=1, shared_intermediate_size=24,
             router=RouterConfig(top_k=2, options={"normalize_weights": False})),
        False, "qwen2_moe"),
    "glm4_moe_sigmoid_bias": (tiny(router=RouterConfig(top_k=2, options={"score_func": "sigmoid"}), moe_layers=[1, 2],
                                   num_shared_experts=1, shared_intermediate_size=20), True, "glm4_moe"),
    "megamoe_capacity": (tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0, "drop_policy": "position"})),
                         False, "megamoe"),
    # trained with drops, dropless at inference: Mixtral computes the same function
    "mixtral_eval_dropless": (tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.0, "drop_policy": "position",
                                                                         "eval_capacity_factor": "dropless"})),
                              False, "mixtral"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_through_hf(case, tmp_path):
    cfg, bias, fmt = CASES[case]
    model = make(cfg, bias=bias)
    save_consolidated(model, tmp_path / "mm")
    report = convert_to_hf(tmp_path / "mm", tmp_path / "hf")
    assert report.format == fmt and report.max_abs_diff <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mm"]  # no temp dirs left behind
    if fmt == "megamoe":
        import megamoe.integrations.hf_model  # noqa: F401  (registers the Auto classes)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == fmt
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    prompt = ids[:1, :5]
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(out, greedy(model, prompt, 6))

    if fmt == "megamoe":  # the registered class trains: loss and the attached aux loss reach the router
        hf.train()
        hf(input_ids=ids, labels=ids).loss.backward()
        assert hf.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="padded batches"):
            hf(input_ids=ids, attention_mask=torch.zeros_like(ids))

    back_report = convert_from_hf(tmp_path / "hf", tmp_path / "back")
    assert back_report.max_abs_diff <= 1e-4 and is_consolidated_dir(tmp_path / "back")
    back = load_consolidated(tmp_path / "back")
    ours = model.state_dict()
    theirs = back.state_dict()
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=0, atol=0, msg=k)


def test_live_model_source_and_tied_embeddings():
    model = make(tiny(tie_embeddings=True, head_dim=16))
    hf, report = megamoe_to_hf(model)
    assert report.format == "mixtral" and hf.config.tie_word_embeddings
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    back = hf_to_megamoe(hf)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_bias_matters_so_verification_is_meaningful():
    # Dropping the ALF-LB bias changes which experts are selected: the probe must see it.
    model = make(tiny(router=RouterConfig(top_k=2, options={"score_func": "sigmoid"})), bias=True)
    hf, _ = megamoe_to_hf(model, format="glm4_moe")
    for layer in hf.model.layers:
        layer.mlp.gate.e_score_correction_bias.zero_()
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("cfg, bias, fmt, fragment", [
    (tiny(router=RouterConfig(top_k=2, options={"score_func": "sigmoid"})), True, "deepseek_v3", "kv_a_layernorm"),
    (tiny(router=RouterConfig(top_k=2, options={"score_func": "sigmoid"})), True, "mixtral", "score_func='sigmoid'"),
    (tiny(router=RouterConfig(top_k=2, options={"capacity_factor": 1.25, "drop_policy": "position"})), False,
     "qwen2_moe",
     "capacity_factor=1.25"),
    (tiny(experts=ExpertConfig(intermediate_size=16, activation="gelu")), False, "mixtral", "activation='gelu'"),
    (tiny(moe_layers=[0, 2]), False, "glm4_moe", "first_k_dense_replace"),
    (tiny(num_shared_experts=1), False, "mixtral", "shared expert"),
    (tiny(), False, "gpt5", "allowed values"),
    (tiny(), False, "auto", "atol=-1"),
])
def test_refusals_name_the_reason_and_write_nothing(tmp_path, cfg, bias, fmt, fragment):
    with pytest.raises(ConversionError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        convert_to_hf(make(cfg, bias=bias), tmp_path / "out", format=fmt, atol=-1 if "atol" in fragment else 1e-4)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_to_hf(make(tiny()), tmp_path / "out")
    report = convert_to_hf(make(tiny()), tmp_path / "out", overwrite=True)
    assert (report.out_dir / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _qwen2_moe(**kw):
    cfg = transformers.Qwen2MoeConfig(vocab_size=61, hidden_size=32, intermediate_size=16, moe_intermediate_size=8,
                                      shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **kw)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def test_from_hf_refuses_what_megamoe_cannot_compute(tmp_path):
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64, sliding_window=8))
    with pytest.raises(ConversionError, match="sliding_window=8"):
        convert_from_hf(mixtral, tmp_path / "a")
    mixtral.config.sliding_window = 64  # a window as long as the context masks nothing
    assert convert_from_hf(mixtral, tmp_path / "a").max_abs_diff <= 1e-4
    shutil.rmtree(tmp_path / "a")
    glm = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        vocab_size=61, hidden_size=32, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
        n_group=2, topk_group=1))  # partial rotary by default
    with pytest.raises(ConversionError, match="partial_rotary_factor=0.5") as err:
        convert_from_hf(glm, tmp_path / "b")
    assert "n_group=2, topk_group=1" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_from_hf_qwen2_moe_qkv_bias_round_trip(tmp_path):
    hf = _qwen2_moe(qkv_bias=True)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 or n.endswith("_proj.bias") else None
    report = convert_from_hf(hf, tmp_path / "mm")
    assert report.max_abs_diff <= 1e-4
    cfg = json.loads((tmp_path / "mm" / "megamoe_config.json").read_text())["model"]
    assert cfg["moe"]["shared_expert_gate"] is True and cfg["moe"]["router"]["options"]["normalize_weights"] is False
    assert cfg["qkv_bias"]
    back = convert_to_hf(tmp_path / "mm", tmp_path / "hf")
    assert back.format == "qwen2_moe"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ConversionError, match="qkv_bias=True: Mixtral attention has no biases"):
        convert_to_hf(tmp_path / "mm", tmp_path / "mx", format="mixtral")


def test_bad_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_to_hf(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="neither a consolidated"):
        convert_to_hf(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "megamoe_config.json").write_text(json.dumps({"model": {"hidden_sise": 3}}))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="hidden_size"):
        convert_to_hf(tmp_path / "bad", tmp_path / "out")


def test_bf16_output_weights(tmp_path):
    from safetensors import safe_open

    model = make(tiny())
    report = convert_to_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert report.max_abs_diff <= 1e-4  # verified in fp32 before the cast
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=0.05, atol=0.1)
