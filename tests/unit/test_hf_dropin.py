"""Drop-in MoE for HF models: upcycling, HF MoE block swap, generate/save/Trainer, errors.

Tiny configs built locally; dense weights are rescaled so outputs are far from trivial.
"""
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import ConfigError, MoELayer, RouterConfig  # noqa: E402
from megamoe.checkpoint.hf_convert import ConversionError, convert_to_hf  # noqa: E402
from megamoe.integrations.hf import (DenseMLPWeights, MLPAdapter, MoETrainerCallback, load_moeified,  # noqa: E402
                                     moeify, swap_moe_blocks)
from megamoe.stats import moe_layers  # noqa: E402

V = 53


def _scaled(model, std=0.2):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def _llama_like(kind):
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    return _scaled(cls[1](cls[0](**kw)))


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    m = _scaled(transformers.GPT2LMHeadModel(cfg))
    with torch.no_grad():  # non-zero Conv1D biases, so a transposition or bias slip shows
        for blk in m.transformer.h:
            blk.mlp.c_fc.bias.normal_(0, 0.2)
            blk.mlp.c_proj.bias.normal_(0, 0.2)
    return m


MODELS = {"llama": lambda: _llama_like("llama"), "mistral": lambda: _llama_like("mistral"),
          "qwen2": lambda: _llama_like("qwen2"), "gpt2": _gpt2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(MODELS))
def test_upcycled_model_equals_dense_at_step_0(kind):
    model = MODELS[kind]()
    ids = torch.randint(0, V, (2, 10))
    dense = _logits(model, ids)
    names = moeify(model, num_experts=4, router=RouterConfig(top_k=2), num_shared_experts=1, seed=1)
    assert len(names) == 4 and len(moe_layers(model)) == 4
    moe = _logits(model, ids)
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)
    # The routers really pick different experts per token (the equality is not from a single expert).
    assert int((moe_layers(model)[0].last_stats.tokens_per_expert_E > 0).sum()) >= 2


def test_layer_selection_noise_and_errors():
    model = _llama_like("llama")
    ids = torch.randint(0, V, (2, 10))
    dense = _logits(model, ids)
    assert moeify(model, num_experts=4, layers="every_other") == ["model.layers.1.mlp", "model.layers.3.mlp"]
    assert isinstance(model.model.layers[1].mlp, MoELayer) and not isinstance(model.model.layers[0].mlp, MoELayer)

    noisy = _llama_like("llama")
    noisy.load_state_dict(_llama_like("llama").state_dict())
    assert moeify(noisy, num_experts=3, layers=[2], upcycle_noise=0.1, seed=0) == ["model.layers.2.mlp"]
    ex = noisy.model.layers[2].mlp.experts
    assert not torch.equal(ex.gate_up_proj[0], ex.gate_up_proj[1])
    assert (_logits(noisy, ids) - dense).abs().max() > 0

    with pytest.raises(ConfigError, match=r"layers=\[7\].*available"):
        moeify(_llama_like("llama"), num_experts=2, layers=[7])
    with pytest.raises(ConfigError, match="layers='some'"):
        moeify(_llama_like("llama"), num_experts=2, layers="some")
    with pytest.raises(ConfigError, match="upcycle_noise"):
        moeify(_llama_like("llama"), num_experts=2, upcycle_noise=-1)
    with pytest.raises(ConfigError, match="top_k=3.*num_experts=2"):
        moeify(_llama_like("llama"), num_experts=2, router=RouterConfig(top_k=3))
    bert_like = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2))
    with pytest.raises(ConfigError, match="no built-in MoE adapter for model_type='mixtral'.*MLPAdapter"):
        moeify(bert_like, num_experts=2)
    with pytest.warns(UserWarning, match="normalize_weights"):
        moeify(_llama_like("llama"), num_experts=2, router=RouterConfig(top_k=2, options={"normalize_weights": False}))


def test_dispatcher_factory_is_used_per_block():
    from megamoe.dispatch.local import LocalDispatcher

    calls = []

    def factory(cfg, index):
        calls.append((cfg.num_experts, index))
        return LocalDispatcher(cfg.num_experts)

    model = _llama_like("llama")
    moeify(model, num_experts=4, layers=[0, 3], dispatcher=factory)
    assert calls == [(4, 0), (4, 3)]
    assert all(isinstance(layer.dispatcher, LocalDispatcher) for layer in moe_layers(model))
    swap_moe_blocks(_mixtral(), dispatcher=factory)
    assert calls[2:] == [(4, 0), (4, 1)]


def test_custom_adapter_by_module_name_pattern():
    model = _llama_like("qwen2")
    ids = torch.randint(0, V, (1, 8))
    dense = _logits(model, ids)
    read = lambda mlp: DenseMLPWeights(up_IH=mlp.up_proj.weight, down_HI=mlp.down_proj.weight,  # noqa: E731
                                       gate_IH=mlp.gate_proj.weight)
    adapter = MLPAdapter(mlp_pattern=r"model\.layers\.(\d+)\.mlp", activation=lambda cfg: "swiglu", read=read)
    assert len(moeify(model, num_experts=2, router=RouterConfig(top_k=1), adapter=adapter)) == 4
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-5, atol=1e-5)


def _mixtral():
    return _scaled(transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)))


def _qwen2_moe():
    return _scaled(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[1], qkv_bias=True)))


def _glm4_moe():
    m = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1))
    m = _scaled(m)
    with torch.no_grad():
        m.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return m


def _deepseek_v3():
    m = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_mtp_layers=0))
    m = _scaled(m)
    with torch.no_grad():
        m.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("make, n", [(_mixtral, 2), (_qwen2_moe, 2), (_glm4_moe, 1), (_deepseek_v3, 1)])
def test_hf_moe_blocks_swap_keeps_outputs(make, n):
    model = make()
    ids = torch.randint(0, V, (2, 9))
    ref = _logits(model, ids)
    assert len(swap_moe_blocks(model)) == n
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(layer.router.weight.grad is not None for layer in moe_layers(model))


@pytest.mark.parametrize("make", [_mixtral, _qwen2_moe, _glm4_moe, _deepseek_v3])
def test_swapped_models_save_reload_and_export_to_their_own_class(make, tmp_path):
    """A model whose HF MoE blocks were swapped and then trained must not load silently wrong:
    stock loaders refuse its save_pretrained directory (they would leave the blocks random and
    drop the MoELayer weights), load_moeified rebuilds it exactly, and convert writes the
    model's own stock class, which computes the same logits."""
    torch.manual_seed(0)
    model = make()
    name = type(model).__name__
    swap_moe_blocks(model, router=None)
    assert type(model).__name__ == name
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # routers and experts move away from the HF weights
        ids = torch.randint(0, V, (4, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="load_moeified"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, V, (2, 9))
    back = load_moeified(str(tmp_path / "m"))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(_logits(clone, ids), _logits(model, ids), rtol=0, atol=0)
    report = convert_to_hf(tmp_path / "m", tmp_path / "hf")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert report.format == model.config.model_type and type(stock).__name__ == name
    torch.testing.assert_close(_logits(stock, ids), _logits(model, ids), rtol=0, atol=1e-5)
    with pytest.raises(ConversionError, match="exports to its own class"):
        convert_to_hf(model, tmp_path / "other", format="qwen2_moe" if report.format != "qwen2_moe" else "mixtral")


def test_aux_loss_reaches_backward_without_touching_the_model_forward():
    model = _llama_like("llama")
    moeify(model, num_experts=4, router=RouterConfig(top_k=2, aux_loss_coef=0.1))
    model.train()
    logits = model(input_ids=torch.randint(0, V, (2, 8))).logits
    (logits * 0.0).sum().backward()  # only the attached aux loss can produce a router gradient
    grads = [layer.router.weight.grad for layer in moe_layers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_generate_and_save_pretrained_roundtrip(tmp_path):
    dense = _gpt2()
    model = _gpt2()
    model.load_state_dict(dense.state_dict())
    moeify(model, num_experts=4, router=RouterConfig(top_k=2), layers=[0, 2], seed=0)
    prompt = torch.randint(1, V, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), dense.generate(prompt, **kw))
    with torch.no_grad():  # train-like drift so the reload is not trivially equal to the dense model
        moe_layers(model)[0].experts.down_proj.mul_(1.5)
    model.save_pretrained(tmp_path / "m")
    back = load_moeified(str(tmp_path / "m"))
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=0)
    assert back.lm_head.weight is back.transformer.wte.weight
    with pytest.raises(ConfigError, match="megamoe_moeify"):
        dense.save_pretrained(tmp_path / "d")
        load_moeified(str(tmp_path / "d"))


def _train(tmp_path, aux_coef):
    from datasets import Dataset

    torch.manual_seed(0)
    model = _llama_like("llama")
    moeify(model, num_experts=4, router=RouterConfig(top_k=2, aux_loss_coef=aux_coef), layers="every_other", seed=0)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, V, (8, 12), generator=gen).tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run{aux_coef}"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[MoETrainerCallback()])
    result = trainer.train()
    return model, result


def test_hf_trainer_trains_moeified_model_with_aux_loss(tmp_path):
    with_aux, result = _train(tmp_path, 1.0)
    without_aux, _ = _train(tmp_path, 0.0)
    assert torch.isfinite(torch.tensor(result.training_loss))
    layers = moe_layers(with_aux)
    assert all(layer.signals.step == 1 and layer.signals.aux_loss_scale == 0.5 for layer in layers)
    # Same seed, data and init: only the aux loss can make the routers end up different.
    diff = (layers[0].router.weight - moe_layers(without_aux)[0].router.weight).abs().max()
    assert diff > 1e-6
    assert float(layers[0].last_stats.aux_loss) > 0
