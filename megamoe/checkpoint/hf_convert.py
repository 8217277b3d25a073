"""Conversion between megamoe models and Hugging Face transformers checkpoints.

Shape legend: E experts, I expert intermediate size, S shared-expert intermediate size,
D hidden size, B batch, L sequence, V vocabulary.

megamoe -> HF (:func:`convert_to_hf`). The source is a live MoETransformerLM, a
consolidated megamoe directory, or a DeepSpeed training checkpoint (consolidated by
``megamoe.checkpoint.reshardable.load_full_state_dict``). Target formats, in the order
``auto`` tries them (the first that computes the same function wins, so no remote code
is needed whenever a stock class fits):

- ``mixtral``: top-k softmax router with renormalised weights, every block MoE, no
  shared expert.
- ``qwen2_moe``: top-k softmax (renormalised or not), any set of dense blocks, an
  optional shared expert (an ungated megamoe shared expert is written with a zero gate,
  sigmoid(0) = 1/2, and its down projection doubled: exact in floating point).
- ``glm4_moe``: top-k *sigmoid* router with an optional ALF-LB selection bias written as
  ``e_score_correction_bias`` and any ``routed_scaling_factor``, GQA attention with full
  rotary; dense blocks only as a prefix; an ungated shared expert (zero-padded to a
  multiple of I).
- ``deepseek_v3``: the same MoE block as ``glm4_moe`` (written with n_group = topk_group
  = 1), for models with ``attention='mla'`` (megamoe's MLA uses DeepseekV3's parameter
  names; the rotary rows of ``q_proj``/``q_b_proj`` and ``kv_a_proj_with_mqa`` are
  permuted into DeepSeek's interleaved layout, ``rope_interleave=True``). GQA models are
  refused: MLA normalises the compressed KV latent and shares one rotary key across
  heads, which GQA cannot be mapped onto.
- ``megamoe``: :class:`~megamoe.integrations.hf_model.MegaMoEForCausalLM`, registered with
  the Auto classes (any router).

A *moeified* Hugging Face model (a Llama / Mistral / Qwen2 model upcycled with
:func:`megamoe.integrations.hf.moeify`, live or its ``save_pretrained`` directory) is a
source too: :mod:`megamoe.checkpoint.hf_moeified` writes the stock class computing the
same function (Mixtral, Qwen2-MoE or GLM-4-MoE) with the MoE-block helpers below
(:func:`moe_problems`, :func:`moe_hf_fields`, :func:`moe_blocks_to_hf`), shared by both
sources.

Before anything is written, the converted model is checked against the source
(:func:`verify_equivalent`): fp32 logits on a probe batch within ``atol`` (max abs diff
reported) and the same greedy tokens; the directory is written atomically, with the
tokenizer the source carries (:mod:`megamoe.checkpoint.tokenizers`).

HF -> megamoe (:func:`convert_from_hf`): Mixtral, Qwen2-MoE (q/k/v biases included),
GLM-4-MoE, DeepSeek-V3 (default RoPE, no group-limited routing) and megamoe-format
checkpoints become a consolidated megamoe directory, with the same check; tokenizer files
are copied along, so ``train.init_from`` keeps the token ids.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from megamoe.checkpoint.consolidated import (CONFIG_NAME, is_consolidated_dir,
                                             load_state_dict_with_buffers, read_model_config, save_consolidated)
from megamoe.checkpoint.integrity import CheckpointError, check_loaded_finite, read_json, verify_directory
from megamoe.checkpoint.staged import check_output_path, write_directory
from megamoe.config import ExpertConfig, MoEConfig, RouterConfig
from megamoe.routing.topk import TopKOptions

FORMATS = ("auto", "mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3", "megamoe")
STOCK_FORMATS = ("mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3")
_ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu"}
_HF_TO_ACT = {v: k for k, v in _ACT_TO_HF.items()}
DEFAULT_ATOL = 1e-4


class ConversionError(ValueError):
    """The model cannot be expressed in the requested format (the message says why)."""


@dataclass
class ConversionReport:
    out_dir: Path
    format: str
    max_abs_diff: float
    probe_shape: tuple[int, int]
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.format} checkpoint to {self.out_dir}",
                 f"verified logits on a {self.probe_shape[0]}x{self.probe_shape[1]} probe batch: "
                 f"fp32 max abs diff = {self.max_abs_diff:.3e}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# ---------------------------------------------------------------------------------- sources
def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "latest").is_file() or any(p.glob("global_step*")))


def _deepspeed_config_dir(path: Path, tag: str | None) -> Path:
    """Where a DeepSpeed checkpoint keeps megamoe_config.json: its root, else the tag dir."""
    if (path / CONFIG_NAME).is_file():
        return path
    if tag is None and (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
    if tag and (path / tag / CONFIG_NAME).is_file():
        return path / tag
    raise FileNotFoundError(f"{path} is a DeepSpeed checkpoint without {CONFIG_NAME} (looked in the directory and "
                            f"in tag {tag!r}); megamoe training checkpoints always write it")


def _select_checkpoint(path: Path, tag: str | None) -> Path | None:
    """The checkpoint inside ``path`` that ``tag`` (or, for a run's checkpoints folder, its
    ``latest`` file) names, when that is a whole megamoe checkpoint of its own; else None
    (``path`` itself is the checkpoint, ``tag`` a DeepSpeed tag inside it)."""
    if tag is not None:
        if not tag or os.sep in tag or tag.startswith("."):
            raise ConversionError(f"--tag {tag!r} is invalid: it must be the name of a folder inside {path}")
        if is_consolidated_dir(path):
            raise ConversionError(f"--tag {tag!r}: {path} is a single checkpoint with no tags (a consolidated "
                                  f"directory or a torch-backend training checkpoint); drop --tag, or pass the folder "
                                  f"that holds it with --tag {path.name}")
        if not (path / tag).is_dir():
            tags = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise FileNotFoundError(f"--tag {tag!r}: {path / tag} does not exist (folders in {path}: {tags})")
        return path / tag if (path / tag / CONFIG_NAME).is_file() else None
    if not (path / CONFIG_NAME).is_file() and (path / "latest").is_file():
        latest = (path / "latest").read_text(encoding="utf-8", errors="replace").strip()
        if latest and os.sep not in latest and (path / latest / CONFIG_NAME).is_file():
            return path / latest  # a training run's checkpoints folder: its newest checkpoint
    return None


def load_megamoe_source(source: Any, *, tag: str | None = None):
    """Return a single-process MoETransformerLM (eval mode, fp32) for ``source``: a live
    MoETransformerLM, a consolidated directory, a training checkpoint of either backend, a
    DeepSpeed checkpoint directory, or a folder of checkpoints (``tag`` picks one; default:
    its ``latest``). Directories are verified against their manifests first."""
    from megamoe.model import MoETransformerLM

    if isinstance(source, MoETransformerLM):
        for m in source.modules():
            disp = getattr(m, "dispatcher", None)
            if disp is not None and disp.num_local_experts != disp.num_experts:
                raise ConversionError("the live model is expert-parallel (this rank holds only some experts); "
                                      "convert its DeepSpeed checkpoint directory instead")
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a MoETransformerLM or a directory path, got {type(source).__name__}")
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    inner = _select_checkpoint(path, tag)
    if inner is not None:
        return load_megamoe_source(inner)
    # A checkpoint's manifest covers everything in it (a DeepSpeed engine folder too); a
    # DeepSpeed save_dir without one is checked per tag below.
    verified = verify_directory(path, marker=CONFIG_NAME).verified
    if is_consolidated_dir(path):
        from megamoe.checkpoint.consolidated import load_consolidated
        return load_consolidated(path, verify=not verified).eval()
    if is_deepspeed_checkpoint(path):
        cfg = read_model_config(_deepspeed_config_dir(path, tag))
        from megamoe.checkpoint.reshardable import load_full_state_dict
        state = load_full_state_dict(str(path), tag=tag, verify=not verified)
        check_loaded_finite(state.items(), path)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        model = MoETransformerLM(cfg)
        load_state_dict_with_buffers(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval()
    raise ConversionError(f"{path} is neither a consolidated megamoe directory ({CONFIG_NAME} + model.safetensors) "
                          "nor a DeepSpeed checkpoint (a 'latest' file or global_step*/ directories)")


# ---------------------------------------------------------------------------------- expressibility
def _bias_state(model) -> dict[int, Tensor]:
    out = {}
    for i, layer in enumerate(model.model.layers):
        b = getattr(getattr(layer.mlp, "router", None), "expert_bias", None)
        if b is not None:
            out[i] = b
    return out


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS or fmt == "auto":
        raise ConversionError(f"format={fmt!r} is invalid: allowed values are "
                              f"{', '.join(repr(f) for f in FORMATS if f != 'auto')}")


def moe_problems(moe: MoEConfig, fmt: str, *, moe_indices: list[int], num_layers: int, layers_field: str,
                 selection_bias: bool) -> list[str]:
    """Why MoE blocks configured by ``moe`` at ``moe_indices`` (of ``num_layers`` blocks) cannot
    be written as stock ``fmt`` blocks. ``layers_field`` names the setting that chose the
    blocks (for messages); ``selection_bias``: some router carries a non-zero expert_bias.
    Shared by megamoe models and moeified Hugging Face models."""
    r = moe.router
    o = r.options if isinstance(r.options, TopKOptions) else TopKOptions()  # others are refused below
    probs: list[str] = []
    if r.name != "topk":
        probs.append(f"router {r.name!r} has no {fmt} equivalent (only the token-choice 'topk' router does)")
    if o.capacity_factor_for(training=False) is not None:  # conversion is for inference: eval capacity
        what = f"router.options.capacity_factor={o.capacity_factor}" if o.eval_capacity_factor is None \
            else f"router.options.eval_capacity_factor={o.eval_capacity_factor}"
        probs.append(f"{what} drops tokens at inference; {fmt} routing is dropless (set "
                     "router.options.eval_capacity_factor: dropless)")
    if moe.experts.activation not in _ACT_TO_HF:
        probs.append(f"experts.activation={moe.experts.activation!r}: {fmt} experts are gated "
                     f"(swiglu or geglu only)")
    if moe.experts.bias:
        probs.append(f"experts.bias=True: {fmt} experts have no biases")
    if not moe_indices:
        probs.append("the model has no MoE blocks")
    if fmt in ("mixtral", "qwen2_moe"):
        if o.score_func != "softmax":
            probs.append(f"router.options.score_func={o.score_func!r}: {fmt} routers use softmax")
        if selection_bias:
            probs.append(f"the routers carry a non-zero selection bias (expert_bias); {fmt} has none")
        if o.routed_scaling_factor != 1.0:
            probs.append(f"router.options.routed_scaling_factor={o.routed_scaling_factor}: {fmt} does not scale the "
                         "routed weights (glm4_moe and deepseek_v3 do)")
    if fmt == "mixtral":
        if not o.normalize_weights:
            probs.append("router.options.normalize_weights=False: Mixtral always renormalises the top-k weights "
                         "(qwen2_moe supports both)")
        if len(moe_indices) != num_layers:
            probs.append(f"{layers_field} has dense blocks: Mixtral has none (qwen2_moe does)")
        if moe.num_shared_experts:
            probs.append("a shared expert is used: Mixtral has none (qwen2_moe does)")
    if fmt in ("glm4_moe", "deepseek_v3"):
        name = {"glm4_moe": "GLM-4-MoE", "deepseek_v3": "DeepSeek-V3"}[fmt]
        if o.score_func != "sigmoid":
            probs.append(f"router.options.score_func={o.score_func!r}: {name} routers use sigmoid")
        if moe_indices and moe_indices != list(range(moe_indices[0], num_layers)):
            probs.append(f"{layers_field}: {name} only has dense blocks as a prefix (first_k_dense_replace)")
        if moe.num_shared_experts and moe.shared_expert_gate:
            probs.append(f"shared_expert_gate=True: {name} shared experts are ungated")
        if moe.num_experts < 2:
            probs.append(f"{name}'s group selection needs num_experts >= 2")
    return probs


def format_problems(model, fmt: str) -> list[str]:
    """Why ``model`` cannot be written as ``fmt`` exactly (empty list: it can)."""
    _check_format(fmt)
    if fmt == "megamoe":
        return []
    cfg = model.config
    probs: list[str] = []
    if fmt == "deepseek_v3" and cfg.attention != "mla":
        probs.append(f"attention={cfg.attention!r}: DeepSeek-V3 uses multi-head latent attention, which "
                     "RMS-normalises the compressed key/value latent (kv_a_layernorm) and shares one rotary key "
                     "across all heads, so grouped-query attention cannot be written into it exactly; use format "
                     "'glm4_moe' (the same sigmoid router with e_score_correction_bias, and GQA attention), "
                     "'megamoe', or train with attention='mla'")
    if fmt != "deepseek_v3" and cfg.attention == "mla":
        probs.append(f"attention='mla': {fmt} uses grouped-query attention (multi-head latent attention is "
                     "format 'deepseek_v3')")
    if fmt == "mixtral" and cfg.qkv_bias:
        probs.append("qkv_bias=True: Mixtral attention has no biases (qwen2_moe and glm4_moe do)")
    nonzero_bias = any(bool(b.abs().max() > 0) for b in _bias_state(model).values())
    return probs + moe_problems(cfg.moe, fmt, moe_indices=cfg.moe_indices(), num_layers=cfg.num_layers,
                                layers_field=f"moe_layers={cfg.moe_layers!r}", selection_bias=nonzero_bias)


def choose_format(model, requested: str = "auto") -> tuple[str, list[str]]:
    """The format to write, and notes on any choices made. Raises ConversionError listing the
    reasons when ``requested`` cannot express the model."""
    if requested not in FORMATS:
        raise ConversionError(f"format={requested!r} is invalid: allowed values are {', '.join(map(repr, FORMATS))}")
    if requested != "auto":
        probs = format_problems(model, requested)
        if probs:
            raise ConversionError(f"cannot convert to {requested!r} exactly:\n  - " + "\n  - ".join(probs)
                                  + "\n(use --format auto to pick a format that can, or --format megamoe)")
        return requested, []
    for fmt in STOCK_FORMATS:
        if not format_problems(model, fmt):
            return fmt, []
    closest = ("deepseek_v3" if model.config.attention == "mla" else
               "qwen2_moe" if getattr(model.config.moe.router.options, "score_func", None) == "softmax"
               else "glm4_moe")
    why = format_problems(model, closest)
    return "megamoe", ["no stock transformers class computes the same function ("
                       + "; ".join(why) + "); writing the megamoe model class (import megamoe.integrations.hf_model "
                       "before AutoModelForCausalLM.from_pretrained)"]


# ---------------------------------------------------------------------------------- megamoe -> HF
def _rope(cfg) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}


def moe_hf_fields(fmt: str, moe: MoEConfig, *, moe_indices: list[int], num_layers: int,
                  dense_intermediate_size: int | None) -> dict[str, Any]:
    """The MoE-block fields of ``fmt``'s transformers config (everything but attention,
    norms, embeddings and RoPE). Shared by megamoe models and moeified HF models."""
    r, inter = moe.router, moe.experts.intermediate_size
    o = r.options  # a top-k router's (moe_problems refuses the others first)
    dense_inter = dense_intermediate_size or inter
    kw: dict[str, Any] = dict(num_experts_per_tok=r.top_k, hidden_act=_ACT_TO_HF[moe.experts.activation])
    if fmt == "mixtral":
        return dict(kw, intermediate_size=inter, num_local_experts=moe.num_experts,
                    router_aux_loss_coef=r.aux_loss_coef, router_jitter_noise=0.0)
    if fmt == "qwen2_moe":
        return dict(kw, intermediate_size=dense_inter, moe_intermediate_size=inter, num_experts=moe.num_experts,
                    shared_expert_intermediate_size=moe.shared_size, norm_topk_prob=o.normalize_weights,
                    decoder_sparse_step=1, mlp_only_layers=[i for i in range(num_layers) if i not in moe_indices],
                    router_aux_loss_coef=r.aux_loss_coef)
    # glm4_moe, deepseek_v3: n_group = topk_group = 1 is plain top-k over all experts.
    return dict(kw, intermediate_size=dense_inter, moe_intermediate_size=inter, n_routed_experts=moe.num_experts,
                n_shared_experts=-(-moe.shared_size // inter), routed_scaling_factor=float(o.routed_scaling_factor),
                n_group=1, topk_group=1, first_k_dense_replace=moe_indices[0], norm_topk_prob=o.normalize_weights)


def hf_config(model, fmt: str, **token_ids: Any):
    """The transformers config of ``fmt`` describing ``model``; ``token_ids`` (bos_token_id,
    eos_token_id, pad_token_id) come from the tokenizer when one is known."""
    import transformers

    cfg = model.config
    if fmt == "megamoe":
        from megamoe.integrations.hf_model import MegaMoEConfig
        return MegaMoEConfig.from_model_config(cfg, selection_bias_layers=sorted(_bias_state(model)), **token_ids)
    moe = moe_hf_fields(fmt, cfg.moe, moe_indices=cfg.moe_indices(), num_layers=cfg.num_layers,
                        dense_intermediate_size=cfg.dense_intermediate_size)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range,
                  tie_word_embeddings=cfg.tie_embeddings, rope_parameters=_rope(cfg), **moe, **token_ids)
    if fmt == "deepseek_v3":
        return transformers.DeepseekV3Config(
            num_key_value_heads=cfg.num_heads, rope_interleave=True, q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=False,
            num_mtp_layers=0, **common)
    common.update(num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size)
    if fmt == "mixtral":
        return transformers.MixtralConfig(sliding_window=None, **common)
    if fmt == "qwen2_moe":
        return transformers.Qwen2MoeConfig(qkv_bias=cfg.qkv_bias, use_sliding_window=False, **common)
    if fmt == "glm4_moe":
        common["rope_parameters"] = dict(_rope(cfg), partial_rotary_factor=1.0)
        return transformers.Glm4MoeConfig(use_qk_norm=False, attention_bias=cfg.qkv_bias, **common)
    raise ConversionError(f"no HF config for format {fmt!r}")


def moe_blocks_to_hf(state: Mapping[str, Tensor], fmt: str, *, moe: MoEConfig, moe_indices: list[int],
                     hidden_size: int) -> dict[str, Tensor]:
    """megamoe MoELayer tensors (``model.layers.{i}.mlp.router.weight``, ``...experts.*``,
    ``...shared_expert.*``) -> ``fmt``'s; every other key passes through unchanged. Shared by
    megamoe models and moeified HF models, whose MoE blocks have the same names."""
    out: dict[str, Tensor] = {}
    for key, v in state.items():
        if ".mlp.shared_expert." in key or key.endswith(".mlp.router.expert_bias"):
            continue  # handled per layer below
        out[key.replace(".mlp.router.weight", ".mlp.gate.weight")] = v
    for i in moe_indices:
        p = f"model.layers.{i}.mlp."
        if fmt in ("glm4_moe", "deepseek_v3"):
            bias = state.get(p + "router.expert_bias")
            out[p + "gate.e_score_correction_bias"] = bias if bias is not None else torch.zeros(moe.num_experts)
        if fmt == "qwen2_moe":
            if moe.num_shared_experts:
                down = state[p + "shared_expert.down_proj.weight"]
                gate = state.get(p + "shared_expert.gate.weight")
                if gate is None:  # ungated: sigmoid(0) * (2 * down) == down, exactly
                    gate, down = torch.zeros(1, hidden_size), down * 2.0
                out[p + "shared_expert_gate.weight"] = gate
                out[p + "shared_expert.down_proj.weight"] = down
                for n in ("gate_proj", "up_proj"):
                    out[p + f"shared_expert.{n}.weight"] = state[p + f"shared_expert.{n}.weight"]
            else:
                out[p + "shared_expert_gate.weight"] = torch.zeros(1, hidden_size)
        if not moe.num_shared_experts and fmt in ("qwen2_moe", "glm4_moe", "deepseek_v3"):
            # These classes always build a shared MLP; a zero-width one adds exactly 0.
            name = "shared_expert" if fmt == "qwen2_moe" else "shared_experts"
            for n, shape in (("gate_proj", (0, hidden_size)), ("up_proj", (0, hidden_size)),
                             ("down_proj", (hidden_size, 0))):
                out[p + f"{name}.{n}.weight"] = torch.zeros(shape)
        if fmt in ("glm4_moe", "deepseek_v3") and moe.num_shared_experts:
            inter = moe.experts.intermediate_size
            width = -(-moe.shared_size // inter) * inter
            # Zero-padded hidden units contribute act(0) * 0 = 0: the padded MLP is the same function.
            for n in ("gate_proj", "up_proj"):
                w = state[p + f"shared_expert.{n}.weight"]
                out[p + f"shared_experts.{n}.weight"] = torch.cat([w, w.new_zeros(width - w.shape[0], w.shape[1])])
            w = state[p + "shared_expert.down_proj.weight"]
            out[p + "shared_experts.down_proj.weight"] = torch.cat([w, w.new_zeros(w.shape[0], width - w.shape[1])], 1)
    return out


def _float_state(model) -> dict[str, Tensor]:
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}


def to_hf_state_dict(model, fmt: str) -> dict[str, Tensor]:
    """megamoe parameter names/layouts -> ``fmt``'s (the inverse is :func:`from_hf_state_dict`)."""
    state = _float_state(model)
    if fmt == "megamoe":
        return state
    cfg = model.config
    out = moe_blocks_to_hf(state, fmt, moe=cfg.moe, moe_indices=cfg.moe_indices(),
                           hidden_size=cfg.hidden_size)
    if fmt == "deepseek_v3":
        _permute_mla_rope(out, cfg, to_interleaved=True)
    return out


def _rope_permutation(rope_dim: int, *, to_interleaved: bool) -> Tensor:
    """Row order mapping rotate-half rotary rows to DeepSeek's interleaved ones (or back).

    DeepseekV3's interleaved RoPE rotates the pairs (x[0], x[1]), (x[2], x[3]), ... and returns
    them as [even | odd] halves; rotate-half RoPE on x[perm] with perm = [0, 2, 4, ..., 1, 3, 5,
    ...] gives the same output. So megamoe rows = interleaved rows[perm], and conversely
    interleaved rows = megamoe rows[argsort(perm)]: an exact permutation of weight rows.
    """
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    return torch.argsort(perm) if to_interleaved else perm


def _permute_mla_rope(state: dict[str, Tensor], cfg, *, to_interleaved: bool) -> None:
    """Permute (in ``state``) the rotary rows of each MLA query and shared rotary key projection."""
    r, qk, c = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    perm = _rope_permutation(r, to_interleaved=to_interleaved)
    head_rows = torch.cat([torch.arange(cfg.qk_nope_head_dim), cfg.qk_nope_head_dim + perm])
    q_rows = torch.cat([h * qk + head_rows for h in range(cfg.num_heads)])
    kv_rows = torch.cat([torch.arange(c), c + perm])
    for key in list(state):
        if key.endswith((".self_attn.q_proj.weight", ".self_attn.q_b_proj.weight")):
            state[key] = state[key][q_rows].contiguous()
        elif key.endswith(".self_attn.kv_a_proj_with_mqa.weight"):
            state[key] = state[key][kv_rows].contiguous()


def build_hf_model(config, state: Mapping[str, Tensor]):
    """Instantiate the HF model for ``config`` and load ``state`` strictly (fp32, eval)."""
    import transformers

    if getattr(config, "model_type", None) == "megamoe":
        import megamoe.integrations.hf_model  # noqa: F401  (registers the Auto classes)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [m for m in missing if "rotary" not in m and not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"converted weights do not fit {type(model).__name__}: missing {sorted(missing)[:6]}, "
                              f"unexpected {sorted(unexpected)[:6]}")
    return model.eval()


def probe_batch(vocab_size: int, max_seq_len: int, *, batch: int = 2, seq: int = 16, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, min(seq, max_seq_len)), generator=gen)


GREEDY_STEPS = 8


@torch.no_grad()
def greedy_tokens(logits_fn: Callable[[Tensor], Tensor], ids_BL: Tensor, steps: int) -> Tensor:
    """``steps`` greedy tokens appended to ``ids_BL`` (whole prefix recomputed each step)."""
    for _ in range(steps):
        ids_BL = torch.cat([ids_BL, logits_fn(ids_BL)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids_BL


@torch.no_grad()
def verify_equivalent(reference: Callable[[Tensor], Tensor], hf_model, ids_BL: Tensor, *, atol: float, what: str,
                      max_len: int | None = None) -> float:
    """Check the converted ``hf_model`` against the source (``reference(ids) -> logits``, in
    eval mode): fp32 logits on the probe batch within ``atol``, and the same greedy tokens
    from a prompt (a differing token is accepted only at a near-tie of the source's two best
    logits, within 2 * atol). Returns the max abs logits difference; raises ConversionError."""
    a = reference(ids_BL).float()
    b = hf_model(input_ids=ids_BL).logits.float()
    diff = float((a - b).abs().max())
    if not diff <= atol:
        raise ConversionError(f"verification failed: {what} logits differ from the source's by {diff:.3e} "
                              f"(tolerance {atol:.1e}) on the probe batch; nothing was written")
    prompt = ids_BL[:1, :min(8, ids_BL.shape[1])]
    steps = min(GREEDY_STEPS, (max_len or 10 ** 9) - prompt.shape[1])
    ref = greedy_tokens(reference, prompt, steps)
    out = greedy_tokens(lambda x: hf_model(input_ids=x).logits, prompt, steps)
    if not torch.equal(ref, out):
        k = int((ref[0] != out[0]).nonzero()[0])
        top2 = reference(ref[:, :k])[0, -1].float().topk(2).values
        if float(top2[0] - top2[1]) > 2 * atol:
            raise ConversionError(f"verification failed: greedy generation differs from the source's at token "
                                  f"{k - prompt.shape[1]} ({int(out[0, k])} instead of {int(ref[0, k])}); nothing "
                                  "was written")
    return diff


def megamoe_to_hf(source: Any, *, format: str = "auto", tag: str | None = None, atol: float = DEFAULT_ATOL,
                  token_ids: Mapping[str, Any] | None = None):
    """Convert in memory: returns ``(hf_model, ConversionReport without out_dir)``.
    ``token_ids``: bos/eos/pad token ids for the HF config (from the tokenizer)."""
    _check_atol(atol)
    model = load_megamoe_source(source, tag=tag)
    fmt, notes = choose_format(model, format)
    cfg_hf = hf_config(model, fmt, **dict(token_ids or {}))
    hf = build_hf_model(cfg_hf, to_hf_state_dict(model, fmt))
    ids = probe_batch(model.config.vocab_size, model.config.max_seq_len)
    was = model.training
    model.eval()
    try:
        diff = verify_equivalent(lambda x: model(x).logits, hf, ids, atol=atol, what=fmt,
                                 max_len=model.config.max_seq_len)
    finally:
        model.train(was)
    return hf, ConversionReport(out_dir=Path(), format=fmt, max_abs_diff=diff, probe_shape=tuple(ids.shape),
                                notes=notes)


def _check_atol(atol: Any) -> None:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ConversionError(f"atol={atol!r} is invalid: must be a number >= 0")


# Texts the exported tokenizer must encode exactly as the sentencepiece model does.
_TOKENIZER_PROBES = ("def f(x):\n    return x  + 1  # two  spaces", " leading space and trailing  ",
                     "Zahlen 12345, Ünïcödé, ＡＢＣ, 漢字, emoji 🙂.", "\n\nparagraph\tbreak")


def source_tokenizer(source: Any, *, tag: str | None = None) -> Path | None:
    """The tokenizer a source directory carries: a directory of HF tokenizer files, or a
    sentencepiece ``tokenizer.model`` (None for live models and directories without one)."""
    from megamoe.checkpoint.tokenizers import find_tokenizer, has_hf_tokenizer

    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    path = Path(source)
    inner = _select_checkpoint(path, tag)  # a run's checkpoints folder: the checkpoint it names
    if inner is not None:
        path, tag = inner, None
    if is_deepspeed_checkpoint(path) and not (path / CONFIG_NAME).is_file():
        path = _deepspeed_config_dir(path, tag)
    if has_hf_tokenizer(path):
        return path
    return find_tokenizer(path)


def _write_tokenizer(tokenizer: Path | None, out: Path) -> list[str]:
    """Write ``tokenizer`` (sentencepiece file, or directory of HF files) into ``out``; notes."""
    from megamoe.checkpoint.tokenizers import check_hf_tokenizer, copy_tokenizer_files, write_hf_tokenizer

    if tokenizer is None:
        return ["the source carries no tokenizer, so AutoTokenizer cannot load this directory (pass "
                "--tokenizer PATH: a sentencepiece .model or a directory of tokenizer files)"]
    if tokenizer.is_dir():
        return [f"tokenizer: copied {', '.join(copy_tokenizer_files(tokenizer, out)) or 'nothing'} from {tokenizer}"]
    if not tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer} does not exist")
    files = write_hf_tokenizer(tokenizer, out)
    check_hf_tokenizer(tokenizer, out, list(_TOKENIZER_PROBES))
    return [f"tokenizer: wrote {', '.join(files)} from {tokenizer} (encodes as the sentencepiece model: no BOS/EOS "
            "added)"]


def convert_to_hf(source: Any, out_dir: str | os.PathLike, *, format: str = "auto", tag: str | None = None,
                  atol: float = DEFAULT_ATOL, overwrite: bool = False, dtype: torch.dtype | None = None,
                  tokenizer: str | os.PathLike | None = None) -> ConversionReport:
    """megamoe (live model, consolidated dir or DeepSpeed checkpoint) or a moeified HF model
    (live, or its ``save_pretrained`` directory) -> HF model directory.

    Verifies logits and greedy tokens before writing (see module docstring); ``dtype`` casts
    the written weights (verification is always in fp32). ``tokenizer``: a sentencepiece
    ``.model`` or a directory of HF tokenizer files to write beside the model (default: the
    one the source carries, see :mod:`megamoe.checkpoint.tokenizers`). Writes atomically.
    """
    from megamoe.checkpoint.hf_moeified import is_moeified_model, moeified_to_hf, verify_moeified_reload
    from megamoe.checkpoint.tokenizers import hf_token_ids
    from megamoe.integrations.hf import is_moeified_dir, load_moeified

    out = Path(out_dir)
    check_output_path(out, inputs=[source] if isinstance(source, (str, os.PathLike)) else [],
                      what="output directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists; pass overwrite=True (CLI: --overwrite)")
    _check_atol(atol)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise FileNotFoundError(f"tokenizer {tokenizer} does not exist (give a sentencepiece .model or a directory "
                                "of Hugging Face tokenizer files)")
    moeified = is_moeified_model(source) or (isinstance(source, (str, os.PathLike)) and is_moeified_dir(source))
    # Loading a megamoe directory verifies it against its manifest: before any of its files is read.
    model = None if moeified else load_megamoe_source(source, tag=tag)
    tok = Path(tokenizer) if tokenizer is not None else source_tokenizer(source, tag=tag)
    token_ids = hf_token_ids(tok) if tok is not None and tok.is_file() else {}
    if moeified:
        live = source if isinstance(source, torch.nn.Module) else load_moeified(str(source))
        hf, report = moeified_to_hf(live, format=format, atol=atol, token_ids=token_ids)
    else:
        hf, report = megamoe_to_hf(model, format=format, atol=atol, token_ids=token_ids)
    if dtype is not None and not (moeified and report.format == "megamoe"):  # never cast the caller's model
        hf = hf.to(dtype)

    def fill(tmp: Path) -> None:
        hf.save_pretrained(str(tmp))
        if moeified and report.format == "megamoe":  # the moeified layout: verified by reloading it
            checked = verify_moeified_reload(hf, tmp, atol=atol)
            report.max_abs_diff, report.probe_shape = checked.max_abs_diff, checked.probe_shape
        report.notes.extend(_write_tokenizer(tok, tmp))

    report.out_dir = write_directory(out, fill, overwrite=overwrite)
    return report


# ---------------------------------------------------------------------------------- HF -> megamoe
def _refuse(model_type: str, problems: list[str]) -> None:
    if problems:
        raise ConversionError(f"cannot convert this {model_type} checkpoint to megamoe exactly:\n  - "
                              + "\n  - ".join(problems))


def _zero_or_absent(state: Mapping[str, Tensor], suffixes: tuple[str, ...]) -> bool:
    return all(not bool(v.abs().max() > 0) for k, v in state.items() if k.endswith(suffixes) and v.numel())


def megamoe_config_from_hf(config, state: Mapping[str, Tensor]):
    """The ModelConfig equivalent to an HF Mixtral/Qwen2-MoE/GLM-4-MoE/DeepSeek-V3 config; refuses
    with ConversionError when some feature has no megamoe equivalent."""
    from megamoe.model import ModelConfig

    mt = getattr(config, "model_type", None)
    if mt == "megamoe":
        return config.model_config()
    if mt not in ("mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3"):
        raise ConversionError(f"model_type={mt!r} is not supported: megamoe reads 'mixtral', 'qwen2_moe', "
                              "'glm4_moe', 'deepseek_v3' and 'megamoe' checkpoints")
    problems: list[str] = []
    act = _HF_TO_ACT.get(config.hidden_act)
    if act is None:
        problems.append(f"hidden_act={config.hidden_act!r}: megamoe gated experts support 'silu' and 'gelu'")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r}: megamoe implements default RoPE only")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']}: megamoe rotates the full head dim")
    sliding = getattr(config, "sliding_window", None) if mt == "mixtral" else (
        config.sliding_window if getattr(config, "use_sliding_window", False) else None)
    if sliding and sliding < config.max_position_embeddings:
        # A window at least as long as the context never masks anything megamoe can run
        # (megamoe refuses sequences longer than max_seq_len).
        problems.append(f"sliding_window={sliding} (< max_position_embeddings={config.max_position_embeddings}): "
                        "megamoe attention is full causal")
    # Qwen2-MoE (qkv_bias) and GLM-4-MoE (attention_bias) put biases on q/k/v only: megamoe's qkv_bias.
    qkv_bias = mt in _QKV_BIAS_FIELD and bool(getattr(config, _QKV_BIAS_FIELD[mt], False))
    biases = _ATTN_BIASES if not qkv_bias else tuple(b for b in _ATTN_BIASES if b not in _QKV_BIASES)
    if not _zero_or_absent(state, biases):
        problems.append("the attention projections have non-zero biases megamoe cannot hold (it has q/k/v "
                        "biases for qwen2_moe and glm4_moe only, via qkv_bias): "
                        + ", ".join(sorted({k.split('.self_attn.')[1] for k, v in state.items()
                                            if k.endswith(biases) and v.numel() and bool(v.abs().max() > 0)})))
    if getattr(config, "use_qk_norm", False):
        problems.append("use_qk_norm=True: megamoe attention has no q/k norm")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if mt == "deepseek_v3":
        attn: dict[str, Any] = dict(attention="mla", q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                                    qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                                    v_head_dim=config.v_head_dim)
        if config.num_key_value_heads != config.num_attention_heads:
            problems.append(f"num_key_value_heads={config.num_key_value_heads} differs from num_attention_heads="
                            f"{config.num_attention_heads}: MLA expands keys/values to every head")
    else:
        attn = dict(num_kv_heads=config.num_key_value_heads, head_dim=head_dim, qkv_bias=qkv_bias)
    kw: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, **attn,
        max_seq_len=config.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=config.rms_norm_eps, initializer_range=config.initializer_range,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
    top_k = config.num_experts_per_tok
    moe_kw: dict[str, Any] = {}
    if mt == "mixtral":
        moe_kw.update(num_experts=config.num_local_experts,
                      experts=ExpertConfig(config.intermediate_size, act or "swiglu"),
                      router=RouterConfig(top_k=top_k, aux_loss_coef=config.router_aux_loss_coef,
                                          jitter_eps=float(config.router_jitter_noise or 0.0)))
    elif mt == "qwen2_moe":
        moe = [i for i in range(config.num_hidden_layers) if i not in config.mlp_only_layers
               and (i + 1) % config.decoder_sparse_step == 0]
        moe_kw.update(num_experts=config.num_experts,
                      experts=ExpertConfig(config.moe_intermediate_size, act or "swiglu"),
                      router=RouterConfig(top_k=top_k, aux_loss_coef=config.router_aux_loss_coef,
                                          options=TopKOptions(normalize_weights=bool(config.norm_topk_prob))))
        kw.update(moe_layers="all" if len(moe) == config.num_hidden_layers else moe,
                  dense_intermediate_size=config.intermediate_size)
        if config.shared_expert_intermediate_size:
            moe_kw.update(num_shared_experts=1, shared_intermediate_size=config.shared_expert_intermediate_size,
                          shared_expert_gate=not _zero_or_absent(state, (".mlp.shared_expert_gate.weight",)))
    else:  # glm4_moe, deepseek_v3
        if config.n_group > 1 and config.topk_group < config.n_group:
            problems.append(f"n_group={config.n_group}, topk_group={config.topk_group}: megamoe's top-k router "
                            "has no group-limited selection (only n_group = topk_group is exact)")
        rsf = config.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not 0 < rsf < float("inf"):
            problems.append(f"routed_scaling_factor={rsf!r}: must be a finite number > 0")
            rsf = 1.0
        k = config.first_k_dense_replace
        moe_kw.update(num_experts=config.n_routed_experts,
                      experts=ExpertConfig(config.moe_intermediate_size, act or "swiglu"),
                      router=RouterConfig(top_k=top_k, aux_loss_coef=0.0,
                                          options=TopKOptions(score_func="sigmoid",
                                                              normalize_weights=bool(config.norm_topk_prob),
                                                              routed_scaling_factor=float(rsf))))
        kw.update(moe_layers="all" if k == 0 else list(range(k, config.num_hidden_layers)),
                  dense_intermediate_size=config.intermediate_size)
        if config.n_shared_experts:
            moe_kw.update(num_shared_experts=config.n_shared_experts,
                          shared_intermediate_size=_used_shared_width(state))
    _refuse(mt, problems)
    return ModelConfig(**kw, moe=MoEConfig(**moe_kw))


_ATTN_BIASES = tuple(f".self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj",
                                                      "kv_a_proj_with_mqa"))
_QKV_BIASES = tuple(f".self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj"))
_QKV_BIAS_FIELD = {"qwen2_moe": "qkv_bias", "glm4_moe": "attention_bias"}


def _used_shared_width(state: Mapping[str, Tensor]) -> int:
    """Width of GLM-4-MoE shared MLPs without their trailing all-zero hidden units (the
    padding :func:`to_hf_state_dict` adds); dropping them leaves the function unchanged."""
    width = 1
    for key, gate in state.items():
        if not key.endswith(".mlp.shared_experts.gate_proj.weight"):
            continue
        up = state[key.replace("gate_proj", "up_proj")]
        down = state[key.replace("gate_proj", "down_proj")]
        used = (gate != 0).any(1) | (up != 0).any(1) | (down != 0).any(0)
        nz = used.nonzero()
        width = max(width, int(nz.max()) + 1 if nz.numel() else 1)
    return width


def from_hf_state_dict(config, state: Mapping[str, Tensor], cfg) -> dict[str, Tensor]:
    """HF (Mixtral/Qwen2-MoE/GLM-4-MoE/DeepSeek-V3/megamoe) names -> megamoe names."""
    mt = config.model_type
    out: dict[str, Tensor] = {}
    for key, v in state.items():
        if "rotary_emb" in key or (key.endswith(_ATTN_BIASES) and not (cfg.qkv_bias and key.endswith(_QKV_BIASES))):
            continue  # checked zero above; megamoe computes RoPE on the fly
        if mt != "megamoe":
            if key.startswith("model.layers.") and int(key.split(".")[2]) >= cfg.num_layers:
                continue  # GLM-4-MoE / DeepSeek-V3 multi-token-prediction layers are not part of the decoder
            key = (key.replace(".mlp.gate.weight", ".mlp.router.weight")
                   .replace(".mlp.gate.e_score_correction_bias", ".mlp.router.expert_bias")
                   .replace(".mlp.shared_expert_gate.weight", ".mlp.shared_expert.gate.weight")
                   .replace(".mlp.shared_experts.", ".mlp.shared_expert."))
        out[key] = v.float() if v.is_floating_point() else v
    if mt == "qwen2_moe" and cfg.moe.num_shared_experts and not cfg.moe.shared_expert_gate:
        # All gates are zero (how an ungated megamoe shared expert is written): sigmoid(0) = 1/2
        # is folded back into the down projection, exactly.
        for key in [k for k in out if k.endswith(".mlp.shared_expert.gate.weight")]:
            del out[key]
            down = key.replace(".gate.weight", ".down_proj.weight")
            out[down] = out[down] * 0.5
    if mt == "deepseek_v3" and getattr(config, "rope_interleave", True):
        _permute_mla_rope(out, cfg, to_interleaved=False)
    if mt in ("glm4_moe", "deepseek_v3") and cfg.moe.num_shared_experts:
        width = cfg.moe.shared_size
        for key in list(out):
            if ".mlp.shared_expert." in key:
                out[key] = out[key][:, :width] if "down_proj" in key else out[key][:width]
    if not cfg.moe.num_shared_experts:  # zero-width shared MLPs of Qwen2-MoE / GLM-4-MoE
        out = {k: v for k, v in out.items() if ".shared_expert." not in k}
    return out


def hf_to_megamoe(hf_model):
    """An HF MoE causal LM (loaded) -> an equivalent MoETransformerLM (fp32, eval)."""
    from megamoe.model import MoETransformerLM

    state = hf_model.state_dict()
    cfg = megamoe_config_from_hf(hf_model.config, state)
    model = MoETransformerLM(cfg)
    load_state_dict_with_buffers(model, from_hf_state_dict(hf_model.config, state, cfg))
    return model.eval()


def convert_from_hf(hf_source: Any, out_dir: str | os.PathLike, *, atol: float = DEFAULT_ATOL,
                    overwrite: bool = False) -> ConversionReport:
    """HF checkpoint directory (or loaded model) -> consolidated megamoe directory, verified."""
    from megamoe.checkpoint.hf_moeified import is_moeified_model
    from megamoe.checkpoint.tokenizers import HF_TOKENIZER_FILES, TOKENIZER_NAME, tokenizer_record

    _check_atol(atol)
    files: list[Path] = []
    if isinstance(hf_source, (str, os.PathLike)):
        check_output_path(out_dir, inputs=[hf_source], what="output directory")
        hf_model = load_hf_model(hf_source)
        files = [Path(hf_source) / n for n in HF_TOKENIZER_FILES if (Path(hf_source) / n).is_file()]
    elif is_moeified_model(hf_source):
        raise ConversionError("this is a moeified model: it converts *to* a stock HF class (convert_to_hf / "
                              "megamoe convert SRC OUT); convert that to megamoe if you need to")
    else:
        hf_model = hf_source
    model, diff, shape = hf_to_megamoe_verified(hf_model, atol=atol)
    extra: dict[str, Any] = {"converted_from": {"model_type": hf_model.config.model_type}}
    spm_files = [f for f in files if f.name == TOKENIZER_NAME]
    if spm_files:
        extra["tokenizer"] = tokenizer_record(spm_files[0])
    path = save_consolidated(model, out_dir, overwrite=overwrite, extra=extra, extra_files=files)
    return ConversionReport(out_dir=path, format="megamoe-consolidated", max_abs_diff=diff, probe_shape=shape,
                            notes=[f"tokenizer: copied {', '.join(f.name for f in files)}"] if files else [])


def hf_to_megamoe_verified(hf_model, *, atol: float = DEFAULT_ATOL):
    """:func:`hf_to_megamoe` followed by :func:`verify_equivalent`: ``(model, max abs
    logits diff, probe shape)``."""
    hf_model = hf_model.float().eval()
    model = hf_to_megamoe(hf_model)
    ids = probe_batch(model.config.vocab_size, model.config.max_seq_len)
    diff = verify_equivalent(lambda x: model(x).logits, hf_model, ids, atol=atol, what="megamoe",
                             max_len=model.config.max_seq_len)
    return model, diff, tuple(ids.shape)


def load_hf_model(path: str | os.PathLike):
    """A stock (or megamoe-format) HF MoE model directory, loaded in fp32; a moeified
    directory is refused with the command that exports it."""
    import transformers

    from megamoe.integrations.hf import is_moeified_dir

    cfg_json = Path(path) / "config.json"
    if not cfg_json.is_file():
        raise FileNotFoundError(f"{cfg_json} not found: expected a Hugging Face model directory")
    if is_moeified_dir(path):
        raise ConversionError(f"{path} is a moeified model (save_pretrained after moeify): it converts *to* a stock "
                              f"HF class: megamoe convert {path} OUT (--direction to-hf)")
    hf_advice = "re-download or re-export the model directory"
    cfg_data = read_json(cfg_json, advice=hf_advice)
    if not isinstance(cfg_data, dict):
        raise CheckpointError(cfg_json, "is not a JSON object (an HF config.json holds one)", hf_advice)
    # A directory megamoe exported carries a manifest: check it; another one is taken as it is.
    verify_directory(path, advice=hf_advice)
    if cfg_data.get("model_type") == "megamoe":
        import megamoe.integrations.hf_model  # noqa: F401
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(path, f"transformers cannot load this model directory ({type(exc).__name__}: "
                                    f"{str(exc)[:300]})", hf_advice) from exc


__all__ = ["FORMATS", "ConversionError", "ConversionReport", "choose_format", "convert_from_hf", "convert_to_hf",
           "format_problems", "greedy_tokens", "hf_config", "hf_to_megamoe", "hf_to_megamoe_verified", "is_deepspeed_checkpoint",
           "load_hf_model", "load_megamoe_source", "megamoe_to_hf", "moe_blocks_to_hf",
           "moe_hf_fields", "moe_problems", "source_tokenizer", "to_hf_state_dict", "verify_equivalent"]
