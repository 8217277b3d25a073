"""Checkpoint formats: consolidated megamoe model directories and conversion to/from Hugging Face.

A *consolidated* megamoe model directory holds ``megamoe_config.json`` ({"model": ModelConfig
as a dict, ...}) and ``model.safetensors`` (the state dict of a single-process
MoETransformerLM). See :mod:`megamoe.checkpoint.consolidated`.

Every directory megamoe writes goes through :mod:`megamoe.checkpoint.staged` (staged copy,
sealed by a sha256 manifest, swapped in, recovered after a kill); every reader verifies it
with :mod:`megamoe.checkpoint.integrity`, which also holds the errors that name a damaged file.
"""
from megamoe.checkpoint.consolidated import (CONFIG_NAME, WEIGHTS_NAME, is_consolidated_dir,
                                             load_consolidated, read_model_config, save_consolidated)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_consolidated_dir", "load_consolidated", "read_model_config",
           "save_consolidated"]
