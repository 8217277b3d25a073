"""Consolidated megamoe model directories: ``megamoe_config.json`` + ``model.safetensors``.

``megamoe_config.json`` is ``{"model": to_dict(ModelConfig), ...}`` (training checkpoints
add their own keys; readers ignore keys they do not know). ``model.safetensors`` is the
state dict of a single-process :class:`~megamoe.model.MoETransformerLM` (all experts, no
expert-parallel sharding). Both files are written through the staged protocol
(:mod:`megamoe.checkpoint.staged`): sealed by ``megamoe_manifest.json`` (sha256 of each
file, verified by :func:`load_consolidated`) and renamed into place, so a reader never sees
a half-written directory. Weights holding NaN or inf are refused before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from megamoe.checkpoint.integrity import (MANIFEST_KEY, MANIFEST_NAME, CheckpointError, check_finite,
                                          check_loaded_finite, load_safetensors, read_json, unverified_warning,
                                          verify_directory)
from megamoe.checkpoint.staged import write_directory
from megamoe.config import ConfigError, from_dict, to_dict

CONFIG_NAME = "megamoe_config.json"
WEIGHTS_NAME = "model.safetensors"


def _model_config_cls():
    from megamoe.model import ModelConfig
    return ModelConfig


def read_model_config(path: str | os.PathLike) -> Any:
    """The ModelConfig stored in ``<path>/megamoe_config.json`` (or the file itself)."""
    p = Path(path)
    cfg_file = p / CONFIG_NAME if p.is_dir() else p
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: a megamoe checkpoint directory must contain {CONFIG_NAME}")
    data = read_json(cfg_file)
    if not isinstance(data, Mapping) or "model" not in data:
        raise CheckpointError(cfg_file, "expected a JSON object with a 'model' key holding the ModelConfig")
    try:
        return from_dict(_model_config_cls(), data["model"], where="model")
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: {exc}") from exc


def is_consolidated_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def _contiguous_cpu(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared storage (tied embeddings) and non-contiguous views.
    out, seen = {}, {}
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            t = t.clone()
        seen[key] = k
        out[k] = t
    return out


def save_consolidated(model: torch.nn.Module, out_dir: str | os.PathLike, *, extra: Mapping[str, Any] | None = None,
                      overwrite: bool = False, extra_files: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``model`` (a single-process MoETransformerLM) as a consolidated directory;
    ``extra_files`` (e.g. the tokenizer's) are copied into it in the same atomic step."""
    from safetensors.torch import save_file

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, _model_config_cls()):
        raise TypeError("save_consolidated expects a megamoe.model.MoETransformerLM (its .config is a ModelConfig)")
    for m in model.modules():
        disp = getattr(m, "dispatcher", None)
        if disp is not None and disp.num_local_experts != disp.num_experts:
            raise ValueError("save_consolidated needs every expert in this process; this model is expert-parallel "
                             "(use megamoe.checkpoint.reshardable.load_full_state_dict on its checkpoint)")
    state = _contiguous_cpu(model.state_dict())
    check_finite(state.items(), what=f"the model directory {out_dir}")
    meta = dict(extra or {})
    meta["model"] = to_dict(cfg)
    meta[MANIFEST_KEY] = MANIFEST_NAME

    def fill(tmp: Path) -> None:
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    return write_directory(out_dir, fill, overwrite=overwrite)


def load_consolidated(path: str | os.PathLike, *, map_location: str = "cpu", verify: bool = True):
    """Build the MoETransformerLM stored in a consolidated directory (strict key check).

    ``verify``: check the directory against its manifest first (:class:`CheckpointError`
    naming a missing or changed file); one written before manifests loads with a warning."""
    from megamoe.model import MoETransformerLM

    p = Path(path)
    if verify and not verify_directory(p, marker=CONFIG_NAME).verified:
        warnings.warn(unverified_warning(p), stacklevel=2)
    if not is_consolidated_dir(p):
        raise FileNotFoundError(f"{p} is not a consolidated megamoe directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = read_model_config(p)
    model = MoETransformerLM(cfg)
    state = load_safetensors(p / WEIGHTS_NAME, device=map_location)
    check_loaded_finite(state.items(), p / WEIGHTS_NAME)
    load_state_dict_with_buffers(model, state)
    return model


def load_state_dict_with_buffers(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """``load_state_dict(strict=True)``, first creating the optional router selection-bias
    buffers (``router.expert_bias``, None until a balancer enables it) the state holds."""
    for name, mod in model.named_modules():
        key = f"{name}.expert_bias" if name else "expert_bias"
        if key in state and hasattr(mod, "enable_selection_bias") and getattr(mod, "expert_bias", None) is None:
            mod.enable_selection_bias()
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing keys {sorted(missing)[:8]}, "
                         f"unexpected keys {sorted(unexpected)[:8]}")
