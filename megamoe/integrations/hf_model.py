"""megamoe's decoder LM as a Hugging Face model class, registered with the Auto classes.

Used when a checkpoint's router or architecture has no stock transformers equivalent (for
example a router other than token-choice top-k, capacity drops, or biased experts).
Importing this module registers ``model_type="megamoe"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` in-process, so ``AutoModelForCausalLM.from_pretrained(dir)``
works without remote code once ``megamoe.integrations.hf_model`` is imported.

Shape legend: B batch, S sequence, V vocabulary.

Parameter names equal a megamoe consolidated state dict (``model.layers.{i}...``,
``lm_head.weight``). ``config.megamoe`` holds the ModelConfig as a dict;
``config.selection_bias_layers`` lists the MoE blocks whose router has an ``expert_bias``
buffer. Generation recomputes the whole prefix at each step (there is no KV cache).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megamoe.config import from_dict, to_dict
from megamoe.model import ModelConfig, MoETransformerLM, RMSNorm, causal_lm_loss, rotary_cos_sin

MODEL_TYPE = "megamoe"


class MegaMoEConfig(PreTrainedConfig):
    """Hugging Face config wrapping a megamoe ModelConfig (``megamoe``: its dict)."""

    model_type = MODEL_TYPE
    megamoe: dict | None = None
    selection_bias_layers: list | None = None
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, *, selection_bias_layers: list[int] | None = None,
                          **kwargs: Any) -> "MegaMoEConfig":
        return cls(megamoe=to_dict(cfg), selection_bias_layers=sorted(selection_bias_layers or []),
                   vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                   max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings, **kwargs)

    def model_config(self) -> ModelConfig:
        if not self.megamoe:
            raise ValueError("MegaMoEConfig.megamoe is empty: it must hold a megamoe ModelConfig as a dict")
        return from_dict(ModelConfig, self.megamoe, where="megamoe")


class MegaMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """MoETransformerLM behind the PreTrainedModel/GenerationMixin interface."""

    config_class = MegaMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegaMoEConfig) -> None:
        super().__init__(config)
        self.mm_config = config.model_config()
        lm = MoETransformerLM(self.mm_config)
        self.model = lm.model
        self.lm_head = lm.lm_head
        for i in config.selection_bias_layers or []:
            self.model.layers[i].mlp.router.enable_selection_bias()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The same initialisation as MoETransformerLM.reset_parameters, per module.
        std = self.mm_config.initializer_range
        for name, p in module.named_parameters(recurse=False):
            with torch.no_grad():
                if isinstance(module, RMSNorm):
                    p.fill_(1.0)
                elif p.dim() >= 2:
                    p.normal_(0.0, std)
                else:
                    p.zero_()
        bias = getattr(module, "expert_bias", None)
        if isinstance(bias, Tensor):
            with torch.no_grad():
                bias.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("MegaMoEForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("MegaMoEForCausalLM does not support padded batches: attention_mask has zeros; "
                             "batch sequences of equal length (or use batch size 1)")
        cfg = self.mm_config
        seq = input_ids.shape[1]
        if seq > cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={cfg.max_seq_len}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(seq, cfg.rope_dim, cfg.rope_theta, device=x.device)
        for layer in self.model.layers:
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        h = self.model.norm(x)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits_BSV = self.lm_head(h)
        loss = causal_lm_loss(logits_BSV, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits_BSV)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        # No KV cache: every step sees the whole prefix.
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def from_megamoe(model: MoETransformerLM) -> MegaMoEForCausalLM:
    """Wrap a single-process MoETransformerLM's weights in a MegaMoEForCausalLM (copies)."""
    bias_layers = [i for i, layer in enumerate(model.model.layers)
                   if getattr(getattr(layer.mlp, "router", None), "expert_bias", None) is not None]
    hf = MegaMoEForCausalLM(MegaMoEConfig.from_model_config(model.config, selection_bias_layers=bias_layers))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


AutoConfig.register(MODEL_TYPE, MegaMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(MegaMoEConfig, MegaMoEForCausalLM, exist_ok=True)

__all__ = ["MegaMoEConfig", "MegaMoEForCausalLM", "from_megamoe", "MODEL_TYPE"]
