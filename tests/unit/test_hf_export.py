"""Moeified HF models -> stock transformers MoE classes: what each format can hold, what is
refused (naming the field), what save_pretrained writes, and the exported tokenizer.

Tiny configs built locally; weights rescaled so routing and logits are far from trivial.
The full upcycle -> train -> export -> clean-interpreter loop is tests/integration/test_hf_loop.py.
"""
import json
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import RouterConfig  # noqa: E402
from megamoe.checkpoint.hf_convert import ConversionError, convert_to_hf, verify_equivalent  # noqa: E402
from megamoe.checkpoint.tokenizers import find_tokenizer, store_tokenizer  # noqa: E402
from megamoe.integrations.hf import (MOEIFIED_MODEL_TYPE, load_moeified, moeify,  # noqa: E402
                                     read_moeified_config)
from megamoe.stats import moe_layers  # noqa: E402

V = 67


def _scaled(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("_proj.bias"):
                p.normal_(0.0, 0.2)
    return model.eval()


def _dense(kind, **extra):
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return _scaled(model_cls(cfg_cls(**dict(kw, **extra))))


def _moe(kind, *, bias=False, **spec):
    extra = spec.pop("extra", {})
    model = _dense(kind, **extra)
    moeify(model, num_experts=4, seed=0, **{"router": RouterConfig(top_k=2), **spec})
    with torch.no_grad():
        for layer in moe_layers(model):  # experts that differ, as after training
            layer.experts.gate_up_proj.normal_(0.0, 0.2)
            if bias:
                layer.router.enable_selection_bias().normal_(0.0, 0.3)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _export(model, path, **kw):
    report = convert_to_hf(model, path, **kw)
    stock = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(stock, ids), _logits(model, ids), rtol=0, atol=1e-5)
    return report, stock, json.loads((path / "config.json").read_text())


def test_sliding_window_and_rope_settings_are_carried(tmp_path):
    # A window shorter than the probe, so it masks something: the export must keep it.
    model = _moe("mistral", extra=dict(sliding_window=5))
    report, _, cfg = _export(model, tmp_path / "mixtral")
    assert report.format == "mixtral" and cfg["sliding_window"] == 5
    ids = torch.randint(0, V, (1, 20))
    model.config.sliding_window = None
    assert (_logits(model, ids) - _logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral"),
                                          ids)).abs().max() > 1e-3  # the window really matters here
    report, _, cfg = _export(_moe("mistral", layers="every_other", extra=dict(sliding_window=5)), tmp_path / "q")
    assert report.format == "qwen2_moe" and set(cfg["layer_types"]) == {"sliding_attention"}
    # Qwen2 with some sliding layers only: Qwen2-MoE's layer_types hold that, Mixtral's one window cannot.
    qwen = _moe("qwen2", layers="all", extra=dict(use_sliding_window=True, sliding_window=5, max_window_layers=3))
    report, _, cfg = _export(qwen, tmp_path / "qwen")
    assert report.format == "qwen2_moe" and cfg["layer_types"] == qwen.config.layer_types
    assert sorted(set(cfg["layer_types"])) == ["full_attention", "sliding_attention"]
    assert cfg["qkv_bias"] is True
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    report, _, cfg = _export(_moe("llama", extra=dict(rope_parameters=rope, tie_word_embeddings=True)),
                             tmp_path / "rope")
    assert cfg["rope_parameters"] == rope and cfg["tie_word_embeddings"] is True and report.format == "mixtral"


def test_sigmoid_router_with_alflb_bias_writes_glm4_moe(tmp_path):
    model = _moe("qwen2", bias=True, layers=[1, 2, 3], num_shared_experts=1,
                 router=RouterConfig(top_k=2, options={"score_func": "sigmoid", "routed_scaling_factor": 1.5}))
    report, stock, cfg = _export(model, tmp_path / "glm")
    assert report.format == "glm4_moe" and cfg["first_k_dense_replace"] == 1 and cfg["attention_bias"] is True
    torch.testing.assert_close(stock.model.layers[2].mlp.gate.e_score_correction_bias,
                               moe_layers(model)[1].router.expert_bias, rtol=0, atol=0)


@pytest.mark.parametrize("make,fmt,fragment", [
    (lambda: _moe("qwen2"), "mixtral", "model_type='qwen2' (q/k/v projections always have biases): Mixtral"),
    (lambda: _moe("llama", extra=dict(attention_bias=True)), "qwen2_moe", "attention_bias=True also gives o_proj"),
    (lambda: _moe("llama", layers="every_other"), "mixtral", "has dense blocks: Mixtral has none"),
    (lambda: _moe("llama", num_shared_experts=1), "mixtral", "a shared expert is used: Mixtral has none"),
    (lambda: _moe("llama", router=RouterConfig(top_k=2, options={"normalize_weights": False})), "mixtral",
     "normalize_weights=False"),
    (lambda: _moe("llama", router=RouterConfig(top_k=2, options={"capacity_factor": 1.0, "drop_policy": "position"})),
     "auto",
     "capacity_factor=1.0 drops tokens"),
    (lambda: _moe("llama", router=RouterConfig(name="expert_choice", top_k=2)), "auto",
     "router 'expert_choice' has no"),
    (lambda: _moe("llama", layers="every_other", router=RouterConfig(top_k=2, options={"score_func": "sigmoid"})),
     "auto",
     "only has dense blocks as a prefix (first_k_dense_replace)"),
    (lambda: _moe("mistral", extra=dict(sliding_window=5), router=RouterConfig(top_k=2,
                                                                               options={"score_func": "sigmoid"})),
     "glm4_moe", "sliding_window=5: GLM-4-MoE attention is full causal"),
    (lambda: _moe("llama"), "deepseek_v3", "multi-head latent attention"),
    (lambda: _moe("llama", bias=True), "mixtral", "non-zero selection bias"),
])
def test_what_a_format_cannot_hold_is_refused_naming_the_field(tmp_path, make, fmt, fragment):
    with pytest.raises(ConversionError) as err:
        convert_to_hf(make(), tmp_path / "out", format=fmt)
    assert fragment in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    model = _scaled(transformers.GPT2LMHeadModel(cfg))
    moeify(model, num_experts=4, router=RouterConfig(top_k=2), seed=0)
    return model


def test_gpt2_has_no_stock_class_and_format_megamoe_writes_the_moeified_layout(tmp_path):
    model = _gpt2()
    with pytest.raises(ConversionError) as err:
        convert_to_hf(model, tmp_path / "auto")
    assert "learned absolute position embeddings" in str(err.value) and "--format megamoe" in str(err.value)
    report = convert_to_hf(model, tmp_path / "mm", format="megamoe")
    assert report.format == "megamoe" and "load_moeified" in report.summary() and report.max_abs_diff <= 1e-6
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(_logits(load_moeified(str(tmp_path / "mm")), ids), _logits(model, ids),
                               rtol=0, atol=0)


def test_save_pretrained_is_refused_by_stock_loading_and_reloads_with_megamoe(tmp_path):
    model = _moe("llama", layers="every_other")
    assert model.config.model_type == "llama"  # the live config is unchanged for transformers' own code
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["model_type"] == MOEIFIED_MODEL_TYPE and data["megamoe_base_model_type"] == "llama"
    for load in (transformers.AutoConfig.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError) as err:
            load(tmp_path / "m")
        assert "megamoe.integrations.hf.load_moeified" in str(err.value) and "megamoe convert" in str(err.value)
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(_logits(load_moeified(str(tmp_path / "m")), ids), _logits(model, ids), rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(model.config))  # the marked config class survives pickling
    assert type(clone) is type(model.config) and clone.megamoe_moeify == model.config.megamoe_moeify
    # Directories written before the refusing model_type still load and convert.
    data["model_type"] = data.pop("megamoe_base_model_type")
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    assert read_moeified_config(tmp_path / "m").model_type == "llama"
    assert convert_to_hf(tmp_path / "m", tmp_path / "hf").format == "qwen2_moe"


def test_bf16_model_is_verified_in_fp32_and_left_as_it_was(tmp_path):
    model = _moe("llama").to(torch.bfloat16)
    report = convert_to_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert report.format == "mixtral" and report.max_abs_diff <= 1e-4
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_verification_refuses_a_different_function():
    a, b = _moe("llama"), _moe("llama")
    with torch.no_grad():
        moe_layers(b)[0].router.weight.normal_(0.0, 1.0)
    ids = torch.randint(0, V, (2, 16))
    with pytest.raises(ConversionError, match="logits differ"):
        verify_equivalent(lambda x: a(input_ids=x).logits, b, ids, atol=1e-4, what="test")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from megamoe.train.corpus import generate_corpus
    from megamoe.train.data import train_tokenizer

    docs = [t for _, t in generate_corpus(120, seed=3)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(docs[:100], str(path), vocab_size=128)
    return path, docs[100:]


def test_exported_tokenizer_encodes_and_decodes_like_training(tmp_path, spm_model):
    import sentencepiece as spm

    path, held_out = spm_model
    with pytest.raises(FileNotFoundError, match="tokenizer .* does not exist"):
        convert_to_hf(_moe("llama"), tmp_path / "x", tokenizer=tmp_path / "missing.model")
    report = convert_to_hf(_moe("llama", extra=dict(vocab_size=128)), tmp_path / "hf", tokenizer=path)
    assert any("tokenizer: wrote tokenizer.json" in n for n in report.notes)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    decoded = 0
    for text in held_out:
        ids = tok(text)["input_ids"]
        assert ids == sp.encode(text)
        if sp.unk_id() not in ids:  # an unknown piece decodes as "<unk>" here, " \u2047 " in sentencepiece
            assert tok.decode(ids) == sp.decode(ids)
            decoded += 1
    assert decoded >= len(held_out) // 2
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    # A moeified directory holding HF tokenizer files passes them on unchanged.
    model = _moe("llama", extra=dict(vocab_size=128))
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    convert_to_hf(tmp_path / "moe", tmp_path / "hf2")
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == (tmp_path / "moe" / "tokenizer.json").read_text()


def test_checkpoint_tokenizer_must_be_the_recorded_one(tmp_path, spm_model):
    path, _ = spm_model
    meta = {"tokenizer": store_tokenizer(path, tmp_path)}
    (tmp_path / "megamoe_config.json").write_text(json.dumps(meta))
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    assert meta["tokenizer"]["special_tokens"]["eos"] == {"id": 2, "piece": "</s>"}
    (tmp_path / "tokenizer.model").write_bytes(b"not the trained model")
    with pytest.raises(ValueError, match="not the tokenizer this checkpoint was trained with"):
        find_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="records a tokenizer"):
        find_tokenizer(tmp_path)
