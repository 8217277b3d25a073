"""NaN and inf: the error that names where they appear, and the cheap ways to find it.

A non-finite value in a token's hidden state is not repaired by any megamoe layer: routing
scores of that token become NaN, so which experts it reaches is arbitrary, and its output is
NaN (token-choice routers keep other tokens' outputs finite; routers that compare tokens with
each other, such as expert choice or the balanced assignment, can spread it). Checking every
layer costs a device-to-host sync per layer, so it is opt-in:

- :func:`set_finite_checks` turns on the per-layer check of every MoE layer in a model
  (``MoELayer.check_finite``): a non-finite input or output raises :class:`NonFiniteError`
  naming the layer.
- :func:`first_nonfinite_module` runs a function with a forward hook on every submodule and
  names the first module, in execution order, whose output holds NaN or inf.
- :func:`first_nonfinite_grad` names the parameter whose gradient went non-finite first.

The trainer uses the last two only after a step has gone non-finite, so they cost nothing
on healthy steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from megamoe.stats import moe_layers


class NonFiniteError(FloatingPointError):
    """A tensor that must be finite holds NaN or inf; the message says where."""


def count_nonfinite(t: Tensor) -> int:
    """Number of NaN/inf entries of ``t`` (0 for integer tensors)."""
    if not t.is_floating_point() and not t.is_complex():
        return 0
    return int((~torch.isfinite(t)).sum())


def require_finite(t: Tensor, what: str) -> None:
    """Raise NonFiniteError naming ``what`` when ``t`` holds NaN or inf (one host sync)."""
    if not t.is_floating_point():
        return
    bad_mask = ~torch.isfinite(t.detach())
    bad = int(bad_mask.sum())
    if bad:
        first = tuple(int(i) for i in bad_mask.nonzero()[0])
        raise NonFiniteError(f"{what} holds {bad} NaN/inf value(s) of {t.numel()} (first at index {first}, "
                             f"shape {tuple(t.shape)})")


def set_finite_checks(model: nn.Module, enabled: bool = True) -> int:
    """Turn the per-layer NaN/inf check of every MoE layer in ``model`` on or off; returns
    how many layers were set."""
    layers = moe_layers(model)
    for layer in layers:
        layer.check_finite = bool(enabled)
    return len(layers)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    for name in ("logits", "loss", "out", "last_hidden_state"):  # output dataclasses
        value = getattr(obj, name, None)
        if isinstance(value, Tensor):
            return [value]
    return []


def describe_module(model: nn.Module, name: str) -> str:
    """``name`` of a submodule of ``model`` (or of a parameter), with the MoE layer it is in."""
    owner = name
    while owner:
        try:
            module = model.get_submodule(owner)
        except AttributeError:  # a parameter's name
            module = None
        if hasattr(module, "check_finite"):  # an MoELayer (duck-typed: this module sits below layer.py)
            index = getattr(module, "layer_index", -1)
            return f"{name} (in MoE layer {index})" if index >= 0 else f"{name} (in an MoE layer)"
        owner = owner.rpartition(".")[0]
    return name or type(model).__name__


def first_nonfinite_module(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Call ``run()`` with a forward hook on every submodule of ``model``; return the
    description of the first module (in execution order) whose output holds NaN or inf, or
    None. Leaf modules and containers both report, so the innermost culprit is named first."""
    found: list[str] = []
    handles = []

    def hook(name: str):
        def fn(module, args, output) -> None:
            if not found and any(count_nonfinite(t.detach()) for t in _tensors(output)):
                found.append(name)
        return fn

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return describe_module(model, found[0]) if found else None


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """The parameter whose gradient went NaN/inf first in the backward pass, as far as the
    gradients tell: backward runs from the output towards the input and NaN spreads along it,
    so it is the last parameter, in model order, with a non-finite gradient. Described with the
    MoE layer it belongs to and how many gradients are affected; None when all are finite."""
    bad = [name for name, p in model.named_parameters() if p.grad is not None and count_nonfinite(p.grad)]
    if not bad:
        return None
    total = sum(1 for p in model.parameters() if p.grad is not None)
    return (f"the gradient of {describe_module(model, bad[-1])} (the last of {len(bad)}/{total} parameters with "
            "non-finite gradients in model order, so the first reached by backward)")


__all__ = ["NonFiniteError", "require_finite", "set_finite_checks", "first_nonfinite_module",
           "first_nonfinite_grad", "count_nonfinite", "describe_module"]
