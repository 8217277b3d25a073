"""Expert activations by name: the one map from ``ExpertConfig.activation`` to its elementwise
function, used by the experts, the shared expert and the Triton kernels' references.

A gated activation (``megamoe.config.GATED_ACTIVATIONS``: swiglu, geglu) applies its function
to the gate half of the first projection and multiplies by the up half.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from megamoe.config import ACTIVATIONS

_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function of activation ``name`` (the gate's, for a gated one)."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return _FUNCTIONS[name]


__all__ = ["activation_fn"]
