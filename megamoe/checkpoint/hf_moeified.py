"""Moeified Hugging Face models -> the stock transformers MoE class computing the same function.

A model upcycled with :func:`megamoe.integrations.hf.moeify` is a Llama / Mistral / Qwen2
model whose MLP blocks are megamoe ``MoELayer`` s. Its attention, norms, embeddings and
dense blocks already have the names of the MoE classes of the same family, and its MoE
blocks have the names of megamoe's own model, so the conversion reuses the MoE-block
writers of :mod:`megamoe.checkpoint.hf_convert` and copies everything else.

Formats (``auto`` takes the first that computes the same function):

- ``mixtral``: Llama / Mistral (no attention biases), every block MoE, softmax top-k with
  renormalised weights, no shared expert. Mistral's ``sliding_window`` is carried over.
- ``qwen2_moe``: softmax top-k, renormalised or not, any dense blocks (``mlp_only_layers``),
  a shared expert (gated, or ungated written with a zero gate); Qwen2's q/k/v biases
  (``qkv_bias``) and sliding-window layers (``layer_types``) are carried over.
- ``glm4_moe``: sigmoid top-k with the ALF-LB selection bias as ``e_score_correction_bias``
  and ``routed_scaling_factor``, dense blocks only as a prefix, ungated shared expert;
  attention without sliding window (q/k/v biases allowed).
- ``deepseek_v3`` never fits: its multi-head latent attention is not GQA.
- ``megamoe``: the moeified layout itself (``save_pretrained``; reload with
  ``load_moeified``), for what no stock class holds, e.g. GPT-2's learned positions.

RoPE settings (``rope_parameters``, any rope type), ``head_dim``, norms' eps, tied
embeddings and the token ids are copied from the base config. A sliding window at least as
long as ``max_position_embeddings`` masks nothing and counts as none. Verification (logits
on a probe batch and greedy tokens) is :func:`megamoe.checkpoint.hf_convert.verify_equivalent`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megamoe.checkpoint.hf_convert import (DEFAULT_ATOL, ConversionError, ConversionReport, build_hf_model,
                                           moe_blocks_to_hf, moe_hf_fields, moe_problems, probe_batch,
                                           verify_equivalent)
from megamoe.config import MoEConfig, to_dict
from megamoe.stats import named_moe_layers

MOEIFIED_FORMATS = ("mixtral", "qwen2_moe", "glm4_moe")  # the order auto tries
GQA_FAMILIES = ("llama", "mistral", "qwen2")
_COPIED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "rope_parameters",
           "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Moeified:
    """What the writers need to know about a moeified HF model."""

    model: nn.Module
    base_type: str
    base: dict[str, Any]
    moe: MoEConfig
    moe_indices: list[int]
    num_layers: int
    selection_bias: bool
    swapped: bool = False  # HF MoE blocks replaced by swap_moe_blocks: the base IS a stock MoE class

    @property
    def layers_field(self) -> str:
        return f"moeify layers={self.moe_indices} (of {self.num_layers} blocks)"


def is_moeified_model(model: Any) -> bool:
    """A live model :func:`~megamoe.integrations.hf.moeify` converted (it marks the config)."""
    from megamoe.integrations.hf import is_moeified_config

    return isinstance(model, nn.Module) and is_moeified_config(getattr(model, "config", None))


def describe(model: nn.Module) -> Moeified:
    """Inspect a moeified model (raises ConversionError when it is not one we can read)."""
    config = model.config
    base_type = getattr(config, "model_type", None)
    blocks = named_moe_layers(model)
    if not blocks:
        raise ConversionError(f"{type(model).__name__} has no megamoe MoE blocks: moeify it first")
    for name, m in blocks:
        if m.dispatcher.num_local_experts != m.config.num_experts:
            raise ConversionError(f"{name} is expert-parallel (this rank holds only some experts); save the full "
                                  "model with save_pretrained from a single process, or load it with load_moeified")
    first = blocks[0][1].config
    differ = [name for name, m in blocks if to_dict(m.config) != to_dict(first)]
    if differ:
        raise ConversionError(f"MoE blocks {differ} are configured differently from {blocks[0][0]}: stock MoE "
                              "classes have one MoE configuration for all blocks")
    base = config.to_dict()  # the live config: its real model_type (save_pretrained writes the refusing one)
    biased = any(getattr(m.router, "expert_bias", None) is not None and bool(m.router.expert_bias.abs().max() > 0)
                 for _, m in blocks)
    for key in ("megamoe_moeify", "megamoe_swap"):
        base.pop(key, None)
    return Moeified(model=model, base_type=base_type, base=base, moe=first,
                    moe_indices=sorted(m.layer_index for _, m in blocks),
                    num_layers=int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)),
                    selection_bias=biased, swapped=getattr(config, "megamoe_swap", None) is not None)


def _window(d: Moeified) -> tuple[int | None, list[str] | None]:
    """(sliding window that masks something, per-layer attention types) of the base model."""
    b = d.base
    limit = b.get("max_position_embeddings") or 0
    if d.base_type == "mistral":
        w = b.get("sliding_window")
        return (w, None) if w and w < limit else (None, None)
    if d.base_type == "qwen2" and b.get("use_sliding_window") and b.get("sliding_window"):
        types = list(b.get("layer_types") or [])
        if b["sliding_window"] < limit and "sliding_attention" in types:
            return b["sliding_window"], types
    return None, None


def _qkv_bias(d: Moeified) -> str | None:
    """The base config field that gives the attention q/k/v biases, if any."""
    if d.base_type == "qwen2":
        return "model_type='qwen2' (q/k/v projections always have biases)"
    if d.base.get("attention_bias"):
        return "attention_bias=True"
    return None


def _block_problems(d: Moeified, fmt: str) -> list[str]:
    """Why ``fmt``'s MoE blocks cannot hold the model's MoE layers exactly."""
    return moe_problems(d.moe, fmt, moe_indices=d.moe_indices, num_layers=d.num_layers,
                        layers_field=d.layers_field, selection_bias=d.selection_bias)


def moeified_problems(d: Moeified, fmt: str) -> list[str]:
    """Why the moeified model ``d`` cannot be written as ``fmt`` exactly (empty: it can)."""
    if fmt == "megamoe":
        return []
    if d.swapped:  # attention, norms and dense blocks are the stock class's own: only the MoE blocks can differ
        if fmt != d.base_type:
            return [f"the MoE blocks were swapped into a {d.base_type} model: it exports to its own class "
                    f"({d.base_type!r}) or to --format megamoe"]
        return _block_problems(d, fmt)
    if d.base_type == "gpt2":
        return ["model_type='gpt2': GPT-2 adds learned absolute position embeddings (transformer.wpe) and uses "
                "LayerNorm with biases; no stock transformers MoE class has either, so no stock format holds "
                "it; use --format megamoe (the moeified layout, loaded with "
                "megamoe.integrations.hf.load_moeified)"]
    if d.base_type not in GQA_FAMILIES:
        return [f"model_type={d.base_type!r}: stock MoE export covers moeified "
                f"{', '.join(GQA_FAMILIES)} models; use --format megamoe (the moeified layout)"]
    if fmt == "deepseek_v3":
        return [f"DeepSeek-V3 uses multi-head latent attention; the {d.base_type} grouped-query attention cannot "
                "be written into it exactly (glm4_moe has GQA and the same sigmoid router)"]
    probs: list[str] = []
    bias = _qkv_bias(d)
    if bias and fmt == "mixtral":
        probs.append(f"{bias}: Mixtral attention has no biases (qwen2_moe and glm4_moe have q/k/v biases)")
    if d.base.get("attention_bias") and fmt != "mixtral":
        probs.append(f"attention_bias=True also gives o_proj a bias: {fmt} has q/k/v biases only")
    window, types = _window(d)
    if window and fmt == "glm4_moe":
        probs.append(f"sliding_window={window}: GLM-4-MoE attention is full causal (mixtral and qwen2_moe have "
                     "sliding windows)")
    if window and types and fmt == "mixtral" and any(t != "sliding_attention" for t in types):
        probs.append("layer_types mixes sliding and full attention: Mixtral applies sliding_window to every "
                     "block (qwen2_moe has layer_types)")
    return probs + _block_problems(d, fmt)


def choose_moeified_format(d: Moeified, requested: str = "auto") -> str:
    allowed = ("auto", *MOEIFIED_FORMATS, "deepseek_v3", "megamoe")
    if requested not in allowed:
        raise ConversionError(f"format={requested!r} is invalid: allowed values are {', '.join(map(repr, allowed))}")
    if requested != "auto":
        probs = moeified_problems(d, requested)
        if probs:
            raise ConversionError(f"cannot convert this moeified {d.base_type} model to {requested!r} exactly:\n"
                                  "  - " + "\n  - ".join(probs)
                                  + "\n(use --format auto to pick a stock format that can, or --format megamoe)")
        return requested
    candidates = (d.base_type,) if d.swapped else MOEIFIED_FORMATS
    for fmt in candidates:
        if not moeified_problems(d, fmt):
            return fmt
    if d.swapped:
        closest = d.base_type
    else:
        closest = "glm4_moe" if getattr(d.moe.router.options, "score_func", None) == "sigmoid" else "qwen2_moe"
    raise ConversionError(f"no stock transformers MoE class computes the same function as this moeified "
                          f"{d.base_type} model (closest: {closest}):\n  - "
                          + "\n  - ".join(moeified_problems(d, closest))
                          + "\n(--format megamoe writes the moeified layout, which "
                          "megamoe.integrations.hf.load_moeified reads)")


def stock_config(d: Moeified, fmt: str, **token_ids: Any):
    """The transformers config of ``fmt`` for the moeified model ``d``."""
    import transformers

    b = d.base
    if d.swapped:  # the model's own config, its MoE fields written from the (possibly retrained) blocks
        cfg = transformers.CONFIG_MAPPING[d.base_type].from_dict(dict(b))
        fields = moe_hf_fields(fmt, d.moe, moe_indices=d.moe_indices, num_layers=d.num_layers,
                               dense_intermediate_size=b.get("intermediate_size"))
        for key, value in {**fields, **token_ids}.items():
            setattr(cfg, key, value)
        return cfg
    kw = {k: b[k] for k in _COPIED if k in b}
    if b.get("head_dim"):
        kw["head_dim"] = b["head_dim"]
    kw.update(moe_hf_fields(fmt, d.moe, moe_indices=d.moe_indices, num_layers=d.num_layers,
                            dense_intermediate_size=b["intermediate_size"]))
    kw.update(token_ids)
    bias = _qkv_bias(d) is not None
    window, types = _window(d)
    if fmt == "mixtral":
        return transformers.MixtralConfig(sliding_window=window, **kw)
    if fmt == "qwen2_moe":
        sliding = dict(use_sliding_window=False)
        if window:
            sliding = dict(use_sliding_window=True, sliding_window=window, max_window_layers=d.num_layers,
                           layer_types=types or ["sliding_attention"] * d.num_layers)
        return transformers.Qwen2MoeConfig(qkv_bias=bias, **sliding, **kw)
    if fmt == "glm4_moe":
        kw["rope_parameters"] = dict(kw.get("rope_parameters") or {}, partial_rotary_factor=1.0)
        return transformers.Glm4MoeConfig(use_qk_norm=False, attention_bias=bias, num_mtp_layers=0, **kw)
    raise ConversionError(f"no stock config for format {fmt!r}")


def stock_state_dict(d: Moeified, fmt: str) -> dict[str, Tensor]:
    state = {k: v.detach().float() if v.is_floating_point() else v.detach()
             for k, v in d.model.state_dict().items()}
    return moe_blocks_to_hf(state, fmt, moe=d.moe, moe_indices=d.moe_indices, hidden_size=int(d.base["hidden_size"]))


def _fp32_reference(d: Moeified) -> nn.Module:
    """The source in fp32 for verification: the model itself, or (for bf16/fp16 models) a
    rebuild from its fp32-cast weights, so buffers such as RoPE frequencies are fp32 as in a
    freshly built stock model (casting the model would keep their low-precision values)."""
    from megamoe.integrations.hf import build_moeified

    if all(p.dtype == torch.float32 for p in d.model.parameters()):
        return d.model
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in d.model.state_dict().items()}
    return build_moeified(d.model.config, state, where="the live model", dtype=torch.float32)


def moeified_to_hf(model: nn.Module, *, format: str = "auto", atol: float = DEFAULT_ATOL,
                   token_ids: dict[str, Any] | None = None):
    """Convert a moeified model in memory: ``(stock_model, ConversionReport without out_dir)``;
    verified before returning. ``format="megamoe"`` returns the model itself (the moeified
    layout, written with save_pretrained)."""
    d = describe(model)
    fmt = choose_moeified_format(d, format)
    if fmt == "megamoe":  # verified after writing, by reloading (verify_moeified_reload)
        return model, ConversionReport(out_dir=Path(), format="megamoe", max_abs_diff=float("nan"),
                                       probe_shape=(0, 0), notes=["wrote the moeified layout: load it with "
                                                                  "megamoe.integrations.hf.load_moeified"])
    hf = build_hf_model(stock_config(d, fmt, **(token_ids or {})), stock_state_dict(d, fmt))
    return hf, _verified_report(d, hf, fmt, atol)


def _verified_report(d: Moeified, other: nn.Module, fmt: str, atol: float) -> ConversionReport:
    src = _fp32_reference(d)
    ids = probe_batch(int(d.base["vocab_size"]), int(d.base.get("max_position_embeddings")
                                                      or d.base.get("n_positions") or 16))
    was = src.training
    src.eval()
    try:
        diff = verify_equivalent(lambda x: src(input_ids=x).logits, other, ids, atol=atol, what=fmt)
    finally:
        src.train(was)
    return ConversionReport(out_dir=Path(), format=fmt, max_abs_diff=diff, probe_shape=tuple(ids.shape))


def verify_moeified_reload(model: nn.Module, directory: str | Path, *, atol: float = DEFAULT_ATOL) -> ConversionReport:
    """Check that ``load_moeified(directory)`` computes what ``model`` does (format megamoe)."""
    from megamoe.integrations.hf import load_moeified

    return _verified_report(describe(model), load_moeified(str(directory)), "megamoe", atol)


__all__ = ["GQA_FAMILIES", "MOEIFIED_FORMATS", "Moeified", "choose_moeified_format", "describe",
           "is_moeified_model", "moeified_problems", "moeified_to_hf", "stock_config", "stock_state_dict",
           "verify_moeified_reload"]
