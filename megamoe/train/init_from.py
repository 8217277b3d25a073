"""``train.init_from: PATH``: start a training run from existing weights.

PATH is a consolidated megamoe directory (for example written by ``megamoe convert
--direction from-hf``), a megamoe training checkpoint (``runs/x/checkpoints/step_N``, either
backend), or a Hugging Face MoE model directory (Mixtral, Qwen2-MoE, GLM-4-MoE,
DeepSeek-V3, megamoe format), which is converted in memory with the same verification as
``megamoe convert``.

- The model config is PATH's: :func:`apply_init_from` fills the ``model`` section from it.
  ``model.*`` settings (config file or overrides) that change the model are refused,
  naming them; settings that only affect training (:data:`TRAINING_ONLY`) may differ, and
  settings equal in effect (``num_kv_heads: null`` vs the explicit head count) are fine.
- The weights are PATH's; optimizer, learning-rate schedule, step and RNG start fresh.
  (``--resume`` continues a run from its own checkpoints, with optimizer and step; once a
  run started with init_from has checkpoints, ``--resume`` continues it.)
- The tokenizer is PATH's sentencepiece model when it has one (``data.tokenizer`` is set
  to it; a different one is refused). PATH with only Hugging Face tokenizer files is
  refused unless ``data.tokenizer`` names the sentencepiece model; PATH without any
  tokenizer trains a new one (the trainer warns: the embeddings were trained on other ids).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

from megamoe.config import ConfigError, from_dict, to_dict

TRAINING_ONLY = ("gradient_checkpointing", "moe.router.aux_loss_coef", "moe.router.z_loss_coef",
                 "moe.router.jitter_eps")


def source_kind(path: str | os.PathLike) -> str:
    """``megamoe`` (a directory with megamoe_config.json) or ``hf`` (with config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"train.init_from={str(path)!r}: no such directory")
    if (p / "megamoe_config.json").is_file():
        return "megamoe"
    if (p / "config.json").is_file():
        from megamoe.integrations.hf import is_moeified_dir
        if is_moeified_dir(p):
            raise ConfigError(f"train.init_from={str(path)!r} is a moeified Hugging Face model, which megamoe train "
                              f"does not build; export it first (megamoe convert {path} OUT) and start from OUT")
        return "hf"
    raise ConfigError(f"train.init_from={str(path)!r} holds neither megamoe_config.json (a megamoe model or "
                      "checkpoint) nor config.json (a Hugging Face model)")


def source_model_config(path: str | os.PathLike):
    """The ModelConfig of the weights at ``path``."""
    from megamoe.checkpoint.consolidated import read_model_config

    if source_kind(path) == "megamoe":
        return read_model_config(path)
    import transformers

    from megamoe.checkpoint.hf_convert import megamoe_config_from_hf
    from megamoe.integrations.hf import _read_weights

    if json.loads((Path(path) / "config.json").read_text()).get("model_type") == "megamoe":
        import megamoe.integrations.hf_model  # noqa: F401  (registers the config class)
    return megamoe_config_from_hf(transformers.AutoConfig.from_pretrained(str(path)), _read_weights(Path(path)))


def load_init_model(path: str | os.PathLike):
    """The MoETransformerLM stored at ``path`` (fp32, eval); HF directories are converted and
    verified as ``megamoe convert`` does."""
    from megamoe.checkpoint.hf_convert import hf_to_megamoe_verified, load_hf_model, load_megamoe_source

    if source_kind(path) == "megamoe":
        return load_megamoe_source(str(path))
    model, _, _ = hf_to_megamoe_verified(load_hf_model(path))
    return model


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def model_differences(a, b, *, ignore: tuple[str, ...] = TRAINING_ONLY) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for each field where the ModelConfigs ``a`` and ``b``
    differ in effect (values left to their derived defaults count as those defaults),
    except the dotted fields in ``ignore``."""
    fa, fb = _flatten(to_dict(a.canonical())), _flatten(to_dict(b.canonical()))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and k not in ignore]


def _tokenizer_for(path: str, data: dict[str, Any]) -> None:
    """Point ``data.tokenizer`` at the init source's sentencepiece model (see module docstring)."""
    from megamoe.checkpoint.tokenizers import TOKENIZER_NAME, file_sha256, find_tokenizer, has_hf_tokenizer

    tok = find_tokenizer(path) if source_kind(path) == "megamoe" else (
        Path(path) / TOKENIZER_NAME if (Path(path) / TOKENIZER_NAME).is_file() else None)
    given = data.get("tokenizer")
    if tok is not None:
        if given and (not os.path.isfile(given) or file_sha256(given) != file_sha256(tok)):
            raise ConfigError(f"data.tokenizer={given!r} is not the tokenizer of train.init_from={path!r} ({tok}): "
                              "the weights only make sense with the token ids they were trained on; remove "
                              "data.tokenizer (init_from supplies it)")
        data["tokenizer"] = str(tok)
    elif has_hf_tokenizer(path) and not given:
        raise ConfigError(f"train.init_from={path!r} has a Hugging Face tokenizer but no sentencepiece "
                          f"{TOKENIZER_NAME}, and megamoe train tokenises with sentencepiece: set data.tokenizer to "
                          "the sentencepiece model these weights were trained with")


def apply_init_from(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``raw`` (a config mapping, overrides applied) with its ``model`` section taken
    from ``train.init_from`` and ``data.tokenizer`` set to its tokenizer; unchanged without
    init_from. Raises ConfigError naming conflicting ``model.*`` / ``data.tokenizer`` settings."""
    out = copy.deepcopy(dict(raw))
    path = (out.get("train") or {}).get("init_from") if isinstance(out.get("train"), Mapping) else None
    if not path or not isinstance(path, str):
        return out  # absent, or invalid (LoopConfig reports it)
    from megamoe.model import ModelConfig

    src = source_model_config(path)
    user = out.get("model") or {}
    if not isinstance(user, Mapping):
        raise ConfigError(f"model={user!r} is invalid: must be a mapping")
    try:
        merged = from_dict(ModelConfig, _merge(to_dict(src), user), where="model")
    except ConfigError as exc:
        raise ConfigError(f"train.init_from={path!r} supplies the model; with the model settings of the config it "
                          f"is invalid: {exc}") from exc
    diffs = model_differences(src, merged)
    if diffs:
        listed = ", ".join(f"model.{k}={b!r} ({path} has {a!r})" for k, a, b in diffs)
        raise ConfigError(f"train.init_from={path!r} supplies the model config, but the config file or overrides "
                          f"set {listed}: remove these from the model section (only "
                          f"{', '.join('model.' + t for t in TRAINING_ONLY)} may differ)")
    out["model"] = to_dict(merged)
    data = out.get("data")
    if data is None:
        data = out["data"] = {}
    if isinstance(data, dict):
        _tokenizer_for(path, data)
    return out


__all__ = ["TRAINING_ONLY", "apply_init_from", "load_init_model", "model_differences", "source_kind",
           "source_model_config"]
