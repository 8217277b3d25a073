"""``train.init_from`` (start a run from existing weights) and what ``--resume`` accepts.

The end-to-end run (HF Mixtral -> import -> megamoe train -> export) is in
tests/integration/test_hf_loop.py; here: how the config is resolved and what is refused.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import ConfigError, ExpertConfig, MoEConfig, RouterConfig  # noqa: E402
from megamoe.checkpoint import save_consolidated  # noqa: E402
from megamoe.checkpoint.hf_convert import convert_from_hf  # noqa: E402
from megamoe.checkpoint.tokenizers import tokenizer_record  # noqa: E402
from megamoe.config import to_dict  # noqa: E402
from megamoe.model import ModelConfig, MoETransformerLM  # noqa: E402
from megamoe.train.config import load_config  # noqa: E402
from megamoe.train.init_from import apply_init_from, load_init_model, model_differences  # noqa: E402
from megamoe.train.trainer import find_resume_checkpoint  # noqa: E402

SRC = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                  moe=MoEConfig(num_experts=4, experts=ExpertConfig(intermediate_size=16),
                                router=RouterConfig(top_k=2)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megamoe.train.corpus import generate_corpus
    from megamoe.train.data import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer([t for _, t in generate_corpus(100, seed=0)], str(path), vocab_size=128)


@pytest.fixture
def weights(tmp_path, tokenizer):
    torch.manual_seed(0)
    return save_consolidated(MoETransformerLM(SRC), tmp_path / "mm", extra={"tokenizer": tokenizer_record(tokenizer)},
                             extra_files=[tokenizer])


def test_model_and_tokenizer_come_from_init_from(weights):
    raw = apply_init_from({"train": {"init_from": str(weights)}})
    assert raw["model"] == to_dict(SRC) and raw["data"]["tokenizer"] == str(weights / "tokenizer.model")
    cfg = load_config(None, [f"train.init_from={weights}", "parallel.backend=torch", "data.seq_len=32"])
    assert cfg.model == SRC and cfg.data.tokenizer == str(weights / "tokenizer.model")


def test_equal_in_effect_and_training_only_settings_are_accepted(weights):
    raw = apply_init_from({"train": {"init_from": str(weights)},
                           "model": {"num_kv_heads": 2, "head_dim": 8, "moe_layers": [0, 1],
                                     "gradient_checkpointing": True, "moe": {"router": {"aux_loss_coef": 0.5}}}})
    assert raw["model"]["gradient_checkpointing"] is True and raw["model"]["moe"]["router"]["aux_loss_coef"] == 0.5
    assert raw["model"]["moe"]["router"]["top_k"] == 2


def test_conflicting_model_settings_are_refused_by_name(weights):
    with pytest.raises(ConfigError) as err:
        apply_init_from({"train": {"init_from": str(weights)},
                         "model": {"hidden_size": 64, "num_kv_heads": None, "moe": {"router": {"top_k": 1}}}})
    msg = str(err.value)
    assert "model.hidden_size=64" in msg and "model.moe.router.top_k=1" in msg and "model.num_kv_heads=4" in msg
    assert "model.num_heads" not in msg


def test_tokenizer_conflicts_are_refused(weights, tmp_path, tokenizer):
    other = tmp_path / "other.model"
    other.write_bytes(b"x")
    with pytest.raises(ConfigError, match="data.tokenizer=.* is not the tokenizer of train.init_from"):
        apply_init_from({"train": {"init_from": str(weights)}, "data": {"tokenizer": str(other)}})
    assert apply_init_from({"train": {"init_from": str(weights)}, "data": {"tokenizer": str(tokenizer)}})
    hf_tok = tmp_path / "hf_tok"
    torch.manual_seed(0)
    save_consolidated(MoETransformerLM(SRC), hf_tok)
    (hf_tok / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="Hugging Face tokenizer but no sentencepiece"):
        apply_init_from({"train": {"init_from": str(hf_tok)}})


def test_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from=.*no such directory"):
        apply_init_from({"train": {"init_from": str(tmp_path / "missing")}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither megamoe_config.json"):
        apply_init_from({"train": {"init_from": str(tmp_path / "empty")}})
    from megamoe.integrations.hf import moeify
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4))
    moeify(dense, num_experts=4)
    dense.save_pretrained(tmp_path / "moeified")
    with pytest.raises(ConfigError, match="moeified Hugging Face model.*megamoe convert"):
        apply_init_from({"train": {"init_from": str(tmp_path / "moeified")}})


def test_stock_hf_directory_is_a_source(tmp_path):
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "mixtral")
    raw = apply_init_from({"train": {"init_from": str(tmp_path / "mixtral")}})
    convert_from_hf(tmp_path / "mixtral", tmp_path / "mm")
    imported = json.loads((tmp_path / "mm" / "megamoe_config.json").read_text())["model"]
    assert raw["model"] == imported
    a, b = load_init_model(tmp_path / "mixtral").state_dict(), load_init_model(tmp_path / "mm").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_for_run_checkpoints(weights, tmp_path):
    with pytest.raises(ConfigError, match="holds model weights only.*train.init_from="):
        find_resume_checkpoint(str(tmp_path / "run"), str(weights))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no megamoe_config.json.*train.init_from="):
        find_resume_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"))


def test_model_configs_compare_in_effect():
    implicit = ModelConfig(num_heads=4, hidden_size=64, moe_layers="all")
    explicit = ModelConfig(num_heads=4, hidden_size=64, num_kv_heads=4, head_dim=16, moe_layers=[0, 1])
    assert model_differences(implicit, explicit, ignore=()) == []
    assert [k for k, _, _ in model_differences(implicit, ModelConfig(num_heads=4, hidden_size=64, num_kv_heads=2),
                                               ignore=())] == ["num_kv_heads"]
    jitter = ModelConfig(moe=MoEConfig(num_experts=8, experts=ExpertConfig(intermediate_size=256),
                                       router=RouterConfig(jitter_eps=0.1)))
    assert model_differences(ModelConfig(), jitter) == []
    assert [k for k, _, _ in model_differences(ModelConfig(), jitter, ignore=())] == ["moe.router.jitter_eps"]
