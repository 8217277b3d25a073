"""A tiny MoE transformer and helpers shared by the distributed tests, the launcher smoke
script and the EP benchmark.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden size, V vocabulary.

The model is embedding -> N blocks (causal single-head self-attention, then an MoELayer,
both pre-norm and residual) -> head. It is deliberately small so that several
DeepSpeed steps on 4 CPU processes take seconds; it is not the library's LM (that lives
in megamoe/model.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe.config import ExpertConfig, MoEConfig, RouterConfig
from megamoe.layer import MoELayer


def moe_config(*, hidden: int = 16, inter: int = 8, experts: int = 4, top_k: int = 2,
               capacity_factor: float | None = None, aux: float = 0.01) -> MoEConfig:
    return MoEConfig(hidden_size=hidden, num_experts=experts,
                     experts=ExpertConfig(intermediate_size=inter, activation="swiglu", impl="loop"),
                     router=RouterConfig(top_k=top_k, aux_loss_coef=aux, options={"capacity_factor": capacity_factor,
                                                                                  "drop_policy": "probs"}))


class Block(nn.Module):
    def __init__(self, config: MoEConfig, layer_index: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.LayerNorm(d)
        self.moe = MoELayer(config, layer_index=layer_index, causal=True)

    def forward(self, x_BSD: Tensor) -> Tensor:
        q, k, v = self.qkv(self.attn_norm(x_BSD)).chunk(3, dim=-1)
        x_BSD = x_BSD + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x_BSD + self.moe(self.mlp_norm(x_BSD))


class TinyMoETransformer(nn.Module):
    def __init__(self, config: MoEConfig, *, vocab: int = 32, num_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, vocab, bias=False)

    def forward(self, tokens_BS: Tensor) -> Tensor:
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, tokens_BS: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over the batch given (moved to the model's device: a
    DeepSpeed engine under NCCL computes on its rank's GPU)."""
    tokens_BS = tokens_BS.to(next(model.parameters()).device)
    logits = model(tokens_BS[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens_BS[:, 1:].reshape(-1))


def global_batches(num_steps: int, *, batch: int, seq: int, vocab: int = 32, seed: int = 1234) -> Tensor:
    """[steps, batch, seq+1] token ids: the same global data on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_steps, batch, seq + 1), generator=g)


def build_model(seed: int = 0, **cfg) -> TinyMoETransformer:
    torch.manual_seed(seed)
    return TinyMoETransformer(moe_config(**cfg))
