"""The dispatcher interface: moving token slots to their experts and back.

Shape legend: T tokens, D hidden size, K slots per token, R routed rows received by this
rank's experts (grouped by local expert, expert 0 first), E_local local experts.

A dispatcher owns whatever process group it communicates over; routers and experts never
see one. ``dispatch`` returns the rows for the local experts and a handle; ``combine``
takes the experts' rows back, applies the combine weights and returns ``out_TD``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from megamoe.routing.base import RoutingDecision


@dataclass
class DispatchHandle:
    """State ``combine`` needs; opaque to the layer except ``tokens_per_local_expert_E``."""

    num_tokens: int
    top_k: int
    slot_idx_R: Tensor          # flat slot index t*K + k of each locally sorted row
    weights_TK: Tensor
    tokens_per_local_expert_E: Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    # Optional combine weight of each received row. A dispatcher that sets it lets the layer
    # apply the weights inside the experts (cheaper); its combine() then adds rows unweighted.
    row_weights_R: Tensor | None = None


class Dispatcher(Protocol):
    num_experts: int
    num_local_experts: int
    local_expert_offset: int

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, DispatchHandle]: ...

    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """out_TD = sum_k w_tk * y_tk."""
        ...

    def unpermute(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """Per-slot outputs y_TKD, unweighted, zeros in empty slots."""
        ...


class _Permute(torch.autograd.Function):
    """x_RD = x_TD[slot_idx // K]; backward sums the K slot gradients of each token in a
    fixed order (deterministic, no atomics)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, slot_idx_R: Tensor, top_k: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(slot_idx_R)
        ctx.shape = (x_TD.shape[0], top_k, x_TD.shape[1])
        return x_TD.index_select(0, torch.div(slot_idx_R, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g_RD: Tensor):  # type: ignore[override]
        (slot_idx_R,) = ctx.saved_tensors
        num_tokens, top_k, dim = ctx.shape
        if g_RD.device.type == "cpu":
            # CPU index_add_ accumulates each destination row in index order: deterministic,
            # and one pass instead of a [T*K, D] scatter plus a reduction.
            token_idx = torch.div(slot_idx_R, top_k, rounding_mode="floor")
            return g_RD.new_zeros(num_tokens, dim).index_add_(0, token_idx, g_RD), None, None
        if top_k == 1 and slot_idx_R.numel() == num_tokens:
            g = g_RD.new_empty(num_tokens, dim)
            g.index_copy_(0, slot_idx_R, g_RD)
            return g, None, None
        full = slot_idx_R.numel() == num_tokens * top_k
        g_full = (g_RD.new_empty if full else g_RD.new_zeros)(num_tokens * top_k, dim)
        g_full.index_copy_(0, slot_idx_R, g_RD)
        return g_full.view(num_tokens, top_k, dim).sum(1), None, None


def permute(x_TD: Tensor, slot_idx_R: Tensor, top_k: int) -> Tensor:
    """Gather token rows into routed order (deterministic backward)."""
    return _Permute.apply(x_TD, slot_idx_R, top_k)


def unpermute(y_RD: Tensor, slot_idx_R: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """y_TKD with row r of y_RD at slot slot_idx_R[r]; zeros in empty slots."""
    num_slots = num_tokens * top_k
    # Dropless: every slot is written, so no zero fill is needed.
    alloc = y_RD.new_empty if slot_idx_R.numel() == num_slots else y_RD.new_zeros
    y_full = alloc(num_slots, y_RD.shape[-1])
    y_full.index_copy_(0, slot_idx_R, y_RD)
    return y_full.view(num_tokens, top_k, y_RD.shape[-1])


def combine_rows(y_RD: Tensor, slot_idx_R: Tensor, weights_TK: Tensor | None, *, num_tokens: int,
                 top_k: int) -> Tensor:
    """out_t = sum_k w_tk * y[slot t*K+k] (weights None: rows are already weighted),
    deterministic on every device.

    On CPU rows are accumulated with index_add_ (sequential per destination row, so
    deterministic, and a single pass); elsewhere through the per-slot buffer and a
    fixed-order reduction over K (no atomics).
    """
    if y_RD.device.type == "cpu":
        rows = y_RD
        if weights_TK is not None:
            rows = y_RD * weights_TK.reshape(-1).index_select(0, slot_idx_R).to(y_RD.dtype).unsqueeze(1)
        token_idx = torch.div(slot_idx_R, top_k, rounding_mode="floor")
        return y_RD.new_zeros(num_tokens, y_RD.shape[-1]).index_add_(0, token_idx, rows)
    y_TKD = unpermute(y_RD, slot_idx_R, num_tokens, top_k)
    return y_TKD.sum(1) if weights_TK is None else weighted_sum(y_TKD, weights_TK)


def row_weights(weights_TK: Tensor, slot_idx_R: Tensor) -> Tensor:
    """Combine weight of each routed row (differentiable)."""
    return weights_TK.reshape(-1).index_select(0, slot_idx_R)


def weighted_sum(y_TKD: Tensor, weights_TK: Tensor) -> Tensor:
    """out_t = sum_k w_tk * y_tk, reduced in slot order (deterministic)."""
    return torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)


def sort_slots(expert_ids_TK: Tensor, tokens_per_expert_E: Tensor, num_experts: int) -> Tensor:
    """Flat slot indices of kept slots, sorted by expert (stable: token order within one)."""
    flat = expert_ids_TK.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    num_kept = int(tokens_per_expert_E.sum().item())
    return order[:num_kept]
