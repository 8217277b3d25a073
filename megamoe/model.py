"""A decoder-only MoE language model built from megamoe layers.

Shape legend: B batch, S sequence, D hidden size, V vocabulary, N query heads, G key/value
heads, Hd head dim.

Architecture (the Mixtral/Llama family): token embedding, L pre-norm blocks of grouped-query
causal self-attention with rotary position embeddings and an MLP (a megamoe MoELayer, or a
dense SwiGLU MLP on layers that are not MoE), RMSNorm, untied LM head. Parameter names
mirror Hugging Face's Mixtral (``model.layers.{i}.self_attn.q_proj.weight`` ...) with the MoE
block at ``model.layers.{i}.mlp`` (``router.weight``, ``experts.gate_up_proj``,
``experts.down_proj``), so conversion to HF formats is a rename. RMSNorm and RoPE follow the
same conventions as HF (fp32 normalisation; rotate-half RoPE), so logits match.

``attention="mla"`` replaces GQA by DeepSeek-V3's multi-head latent attention
(:class:`MLAttention`, HF DeepseekV3 parameter names), so such models convert to the stock
``deepseek_v3`` format by a rename (plus a fixed permutation of the rotary rows).

RMSNorm uses apex's fused kernel when apex is importable and the tensor is on CUDA, and
torch's ``rms_norm`` otherwise (see :func:`rms_norm_backend`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megamoe.config import ConfigError, ExpertConfig, MoEConfig, check_fields, merge_moved, spec
from megamoe.layer import MoELayer

ATTENTIONS = ("gqa", "mla")
MOE_LAYER_PATTERNS = ("all", "every_other", "none")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
DEFAULT_NUM_EXPERTS, DEFAULT_EXPERT_WIDTH = 8, 256
# ModelConfig's MoE fields before they moved into ``moe`` (read with a ConfigLayoutWarning).
OLD_MOE_FIELDS = ("num_experts", "experts", "router", "num_shared_experts", "shared_intermediate_size",
                  "shared_expert_gate")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder LM.

    moe_layers: which blocks use an MoE MLP: ``"all"``, ``"every_other"`` (1, 3, 5, ...,
        Switch style) or a list of block indices. Other blocks use a dense SwiGLU MLP of
        width ``dense_intermediate_size``.
    moe: the MoE layer of every MoE block (megamoe.config.MoEConfig: experts, router, shared
        experts); its ``hidden_size`` is the model's (leave it unset). Configs written before
        this section kept ``num_experts``, ``experts``, ``router``, ``num_shared_experts``,
        ``shared_intermediate_size`` and ``shared_expert_gate`` at the model level; they are
        read into ``moe`` with a ConfigLayoutWarning.
    gradient_checkpointing: recompute each block in backward (saves activation memory).
    attention: ``"gqa"`` (grouped-query attention, ``num_kv_heads``/``head_dim``) or ``"mla"``
        (DeepSeek-V2/V3 multi-head latent attention, see :class:`MLAttention`), which needs
        ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim`` and ``v_head_dim``;
        ``q_lora_rank`` compresses the queries too (None: a full-rank ``q_proj``). The MLA
        fields must be unset for GQA, and ``num_kv_heads``/``head_dim`` unset for MLA.
    allow_noncausal_drops: accept a router whose drops let later tokens affect earlier ones
        (top-k with a capacity and ``drop_policy: probs``), which a causal LM otherwise refuses.
    qkv_bias: GQA query/key/value projections carry biases (Qwen2 / Qwen2-MoE style; the
        output projection never does).
    """

    vocab_size: int = spec(4096, ge=1)
    hidden_size: int = spec(128, ge=1)
    num_layers: int = spec(2, ge=1)
    num_heads: int = spec(4, ge=1)
    num_kv_heads: int | None = spec(None, ge=1)
    head_dim: int | None = spec(None, ge=1)
    max_seq_len: int = spec(2048, ge=1)
    rope_theta: float = spec(10000.0, gt=0)
    rms_norm_eps: float = spec(1e-5, gt=0)
    initializer_range: float = spec(0.02, gt=0)
    tie_embeddings: bool = False
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=DEFAULT_NUM_EXPERTS, experts=ExpertConfig(intermediate_size=DEFAULT_EXPERT_WIDTH)))
    moe_layers: str | Sequence[int] = spec("all", choices=MOE_LAYER_PATTERNS, ge=0)
    dense_intermediate_size: int | None = spec(None, ge=1)
    gradient_checkpointing: bool = False
    attention: str = spec("gqa", choices=ATTENTIONS)
    q_lora_rank: int | None = spec(None, ge=1)
    kv_lora_rank: int | None = spec(None, ge=1)
    qk_nope_head_dim: int | None = spec(None, ge=1)
    qk_rope_head_dim: int | None = spec(None, ge=1)
    v_head_dim: int | None = spec(None, ge=1)
    allow_noncausal_drops: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        n = type(self).__name__
        if self.moe.hidden_size is None:
            object.__setattr__(self, "moe", dataclasses.replace(self.moe, hidden_size=self.hidden_size))
        elif self.moe.hidden_size != self.hidden_size:
            raise ConfigError(f"{n}.moe.hidden_size={self.moe.hidden_size} is invalid: it must equal {n}.hidden_size="
                              f"{self.hidden_size} (leave it unset: the MoE layers take the model's width)")
        if self.attention == "mla":
            self._check_mla(n)
            if self.qkv_bias:
                raise ConfigError(f"{n}.qkv_bias=True is invalid with attention='mla': MLA projections have no "
                                  "biases (set qkv_bias: false)")
        else:
            for name in MLA_FIELDS:
                if getattr(self, name) is not None:
                    raise ConfigError(f"{n}.{name}={getattr(self, name)!r} is invalid: it is only used with "
                                      "attention='mla' (leave it unset for attention='gqa')")
            kv = self.kv_heads
            if self.num_heads % kv != 0:
                raise ConfigError(f"{n}.num_kv_heads={kv} is invalid: must divide num_heads={self.num_heads}")
            if self.head_dim is None and self.hidden_size % self.num_heads != 0:
                raise ConfigError(f"{n}.num_heads={self.num_heads} is invalid: must divide hidden_size="
                                  f"{self.hidden_size} (or set head_dim)")
            if self.head_size % 2 != 0:
                raise ConfigError(f"{n}.head_dim={self.head_size} is invalid: rotary embeddings need an even "
                                  "head dim")
        if not isinstance(self.moe_layers, str):
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"{n}.moe_layers={list(self.moe_layers)!r} is invalid: indices must be in "
                                  f"[0, {self.num_layers})")
        if self.moe_layers != "all" and self.dense_intermediate_size is None:
            object.__setattr__(self, "dense_intermediate_size",
                               self.moe.experts.intermediate_size * self.moe.router.top_k)
        self._check_router_causal()

    @classmethod
    def _migrate(cls, data: dict, where: str) -> list[tuple[str, str]]:
        """(In place, for :func:`megamoe.config.from_dict`.) The MoE fields of the layout before
        ``moe`` (model level) move into ``moe``; a ``moe`` section that leaves out
        ``num_experts`` or ``experts`` gets the defaults a model without one has."""
        moved = [k for k in OLD_MOE_FIELDS if k in data]
        moe = data.get("moe")
        if not moved and not isinstance(moe, Mapping):
            return []
        moe = dict(moe) if isinstance(moe, Mapping) else {}
        for key in moved:
            merge_moved(moe, key, data.pop(key))
        moe.setdefault("num_experts", DEFAULT_NUM_EXPERTS)
        moe.setdefault("experts", {"intermediate_size": DEFAULT_EXPERT_WIDTH})
        data["moe"] = moe
        base = f"{where}." if where else ""
        return [(f"{base}{k}", f"{base}moe.{k}") for k in moved]

    def _trim_dict(self, data: dict) -> dict:
        """(For :func:`megamoe.config.to_dict`.) ``moe.hidden_size`` is always the model's: it is
        left out, so that a saved config takes another ``hidden_size`` as a whole."""
        data["moe"].pop("hidden_size", None)
        return data

    def _check_router_causal(self) -> None:
        from megamoe.routing.base import router_class
        n = type(self).__name__
        if self.moe_layers == "none" or self.allow_noncausal_drops:
            return
        router = self.moe.router
        problem = router_class(router).causal_problem(router)
        if problem:
            raise ConfigError(
                f"{n}.moe.router is invalid for this causal (decoder) LM: {problem}. Use "
                "moe.router.options.drop_policy: position (earlier tokens first: causal within a sequence), or "
                "dropless routing (moe.router.options.capacity_factor: null and eval_capacity_factor: null or "
                f"'dropless'), or set {n}.allow_noncausal_drops: true to accept the leak.")

    def _check_mla(self, n: str) -> None:
        for name in ("num_kv_heads", "head_dim"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{n}.{name}={getattr(self, name)!r} is invalid with attention='mla': MLA heads are "
                                  "sized by qk_nope_head_dim, qk_rope_head_dim and v_head_dim (leave it unset)")
        for name in MLA_FIELDS:
            v = getattr(self, name)
            if v is None and name == "q_lora_rank":
                continue
            if v is None:
                raise ConfigError(f"{n}.{name} is required with attention='mla' (a positive integer)")
        if self.qk_rope_head_dim % 2 != 0:
            raise ConfigError(f"{n}.qk_rope_head_dim={self.qk_rope_head_dim} is invalid: rotary embeddings need "
                              "an even dimension")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.attention == "mla" else (self.num_kv_heads or self.num_heads)

    @property
    def rope_dim(self) -> int:
        """Rotary dimension per head: the head dim (GQA) or qk_rope_head_dim (MLA)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_size

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def is_moe_layer(self, index: int) -> bool:
        if self.moe_layers == "all":
            return True
        if self.moe_layers == "none":
            return False
        if self.moe_layers == "every_other":
            return index % 2 == 1
        return index in self.moe_layers

    def moe_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def canonical(self) -> "ModelConfig":
        """The same model with every value that is derived when unset written out (key/value
        heads, head dim, the MoE block indices, dense and shared widths), so two configs that
        build the same model compare equal (``a.canonical() == b.canonical()``)."""
        moe = self.moe_indices()
        kw: dict = dict(moe_layers="all" if len(moe) == self.num_layers else moe,
                        dense_intermediate_size=self.dense_intermediate_size if len(moe) < self.num_layers else None,
                        moe=dataclasses.replace(self.moe, shared_intermediate_size=self.moe.shared_size or None))
        if self.attention == "gqa":
            kw.update(num_kv_heads=self.kv_heads, head_dim=self.head_size)
        return dataclasses.replace(self, **kw)


def _apex_rms_norm():
    try:
        from apex.normalization import fused_layer_norm  # type: ignore[import-not-found]
    except Exception:  # apex absent or built without its CUDA extensions
        return None
    return getattr(fused_layer_norm, "fused_rms_norm_affine", None)


_APEX_RMS = _apex_rms_norm()


def rms_norm_backend(x: Tensor, apex_fn=None) -> str:
    """Which RMSNorm implementation runs for ``x``: ``apex`` (fused CUDA kernel, when apex
    is importable and x is on CUDA) or ``torch``."""
    fn = _APEX_RMS if apex_fn is None else apex_fn
    return "apex" if fn is not None and x.is_cuda else "torch"


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 (as HF Llama/Mixtral do)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if rms_norm_backend(x) == "apex":
            return _APEX_RMS(x, self.weight, self.weight.shape, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, *, device, dtype=torch.float32,
                   offset: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin [S, Hd] for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x_BNSH: Tensor, cos_SH: Tensor, sin_SH: Tensor) -> Tensor:
    half = x_BNSH.shape[-1] // 2
    rotated = torch.cat((-x_BNSH[..., half:], x_BNSH[..., :half]), dim=-1)
    return x_BNSH * cos_SH + rotated * sin_SH


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE (scaled_dot_product_attention); optional
    q/k/v biases (``ModelConfig.qkv_bias``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_BSD: Tensor, cos_SH: Tensor, sin_SH: Tensor) -> Tensor:
        b, s, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos_SH.to(q.dtype), sin_SH.to(q.dtype)), apply_rotary(k, cos_SH.to(k.dtype),
                                                                                     sin_SH.to(k.dtype))
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLAttention(nn.Module):
    """Multi-head latent attention as DeepSeek-V2/V3 (and HF's DeepseekV3Attention) compute it.

    Shapes: C kv_lora_rank, Q q_lora_rank, P qk_nope_head_dim, R qk_rope_head_dim,
    Vd v_head_dim. Queries: ``q_proj`` [N(P+R), D], or ``q_b_proj(q_a_layernorm(q_a_proj x))``.
    Keys/values: ``kv_a_proj_with_mqa`` [C+R, D] gives a latent (RMS-normalised by
    ``kv_a_layernorm``) and one rotary key shared by all heads; ``kv_b_proj`` [N(P+Vd), C]
    expands the latent into per-head non-rotary keys and values. Scores use the scale
    1/sqrt(P+R). The latent norms use eps 1e-6 (DeepSeek-V3's, independent of rms_norm_eps).
    RoPE is rotate-half over each head's last R dims of q and k; DeepSeek's interleaved
    layout is the same function after a fixed permutation of those rows (done at conversion).
    """

    LATENT_EPS = 1e-6

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk = self.nope + self.rope
        d = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, self.LATENT_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, self.LATENT_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, d, bias=False)

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        b, s, _ = x_BSD.shape
        n = self.num_heads
        q = self.q_proj(x_BSD) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope, q_rot = q.view(b, s, n, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, n, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        cos, sin = cos_SR.to(q.dtype), sin_SR.to(q.dtype)
        q_rot = apply_rotary(q_rot, cos, sin)
        k_rot = apply_rotary(k_rot.view(b, 1, s, self.rope), cos, sin).expand(b, n, s, self.rope)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(P+R)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, n * self.v_dim))


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names gate_proj, up_proj, down_proj."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(index):
            self.mlp: nn.Module = MoELayer(cfg.moe, layer_index=index, causal=True)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x_BSD: Tensor, cos_SH: Tensor, sin_SH: Tensor) -> Tensor:
        h = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_SH, sin_SH)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LMOutput(dict):
    """What :class:`MoETransformerLM` returns: ``.logits`` [B, S, V] and ``.loss`` (a scalar,
    or None without labels), also readable as ``out["loss"]``.

    A dict, so DeepSpeed ZeRO-3 finds the tensors in it (its backward hooks walk tuples,
    lists and dicts; any other output type makes it warn that its hooks may not fire), like
    Hugging Face's ``ModelOutput``.
    """

    def __init__(self, *, logits: Tensor, loss: Tensor | None = None) -> None:
        super().__init__(logits=logits, loss=loss)

    @property
    def logits(self) -> Tensor:
        return self["logits"]

    @property
    def loss(self) -> Tensor | None:
        return self["loss"]


class MoETransformerLM(nn.Module):
    """Decoder-only MoE LM (see module docstring). ``forward(input_ids, labels=None)``.

    With labels, the loss is next-token cross entropy: position t predicts labels[t+1];
    label -100 is ignored. MoE aux losses reach autograd through the activations.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.zeros_(p)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> LMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(seq, self.config.rope_dim, self.config.rope_theta, device=x.device)
        for layer in self.model.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return LMOutput(logits=logits, loss=loss)


def causal_lm_loss(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    """Mean next-token cross entropy in fp32; labels of -100 are ignored."""
    shift_logits = logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]).float()
    shift_labels = labels_BS[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and active-per-token parameter counts (experts counted at top_k / num_experts)."""
    total = sum(p.numel() for p in model.parameters())
    active = 0.0
    for name, p in model.named_parameters():
        if ".experts." in name:
            cfg = getattr(model, "config", None)
            frac = (cfg.moe.router.top_k / cfg.moe.num_experts) if isinstance(cfg, ModelConfig) else 1.0
            active += p.numel() * frac
        else:
            active += p.numel()
    return {"total": total, "active": int(math.ceil(active))}
