"""The dispatcher: how token slots reach their experts and come back.

Shape legend: T tokens, D hidden size, K slots per token, R routed rows (kept slots
grouped by expert, expert 0 first), E experts, E_local local experts.

One MoE layer is ``Dispatcher.run(x_TD, decision, experts) -> out_TD``. The default ``run``
is dispatch -> experts -> combine; a backend overrides it where it can fuse (the
single-process CPU loop in :class:`~megamoe.dispatch.local.LocalDispatcher`), and the
all-to-all dispatcher inherits it with its own dispatch and combine. The experts'
implementation (``ExpertBank.impl_for``) is resolved once per call, in ``run``; with
``"triton"`` the permute and combine below use the Triton kernels of ``megamoe.kernels``.

Combine weights have one owner: the experts. ``dispatch`` hands each row's weight
(``DispatchHandle.row_weights_R``) to the experts, which fold it into their activation (the
narrow side of the MLP; fused into the Triton activation kernel), so expert rows come back
already weighted and ``combine`` only adds each token's rows.

A dispatcher owns whatever process group it communicates over; routers and experts never
see one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from megamoe.routing.base import RoutingDecision

if TYPE_CHECKING:
    from megamoe.experts import ExpertBank


@dataclass
class SlotMap:
    """Where the kept slots of one decision go, in routed order (sorted by expert; stable,
    so token order within an expert).

    slot_idx_R: flat slot index t*K + k of each routed row.
    token_idx_R: the token of each routed row (slot_idx_R // K).
    row_of_slot_TK: the inverse map, the row of slot (t, k) or -1 where the slot is
        dropped or empty (padding rows included: no slot reads them); built only when asked
        for (the Triton kernels use it).
    valid_R: None when every row is a kept slot; else bool [R], False on the padding rows
        that follow the kept ones (see :func:`map_slots`, ``static_rows``).
    gather_idx_R: ``token_idx_R`` with -1 on the padding rows, built with the inverse map: the
        index the row kernels take (their gather writes a zero row for -1, and their
        gather-sum, the permute's backward and the combine's, sends such a row no gradient).
    """

    num_tokens: int
    top_k: int
    slot_idx_R: Tensor
    token_idx_R: Tensor
    row_of_slot_TK: Tensor | None = None
    valid_R: Tensor | None = None
    gather_idx_R: Tensor | None = None

    def group_sizes(self, tokens_per_expert_E: Tensor) -> Tensor:
        """Rows per expert for the experts: the kept counts, with the padding rows (if any)
        counted in the last expert's group, so the groups cover all R rows."""
        if self.valid_R is None:
            return tokens_per_expert_E
        num_rows = self.slot_idx_R.numel()
        pad = num_rows - tokens_per_expert_E.sum()
        return torch.cat([tokens_per_expert_E[:-1], tokens_per_expert_E[-1:] + pad])


def map_slots(decision: RoutingDecision, num_experts: int, *, inverse: bool = False,
              static_rows: bool = False) -> SlotMap:
    """Sort the decision's kept slots by expert.

    No host synchronisation when ``decision.dropless`` (R = T*K is known from the shapes).
    Otherwise slots may be dropped, and the number of rows R is either
    - with ``static_rows`` and a decision that bounds its kept slots on the host
      (``decision.kept_bound``, e.g. E*C under a capacity): R = min(T*K, kept_bound), again
      known without reading device data. The kept rows come first; the rest are padding
      rows (dropped slots, in sort order) marked by ``valid_R``: they enter the experts as
      zeros (:func:`permute`), get zero combine weights (:func:`row_weights`), no slot reads
      them (:func:`combine_rows`, :func:`unpermute`) and the last expert's group holds them
      (:meth:`SlotMap.group_sizes`). The price is computing those rows: at most the dropped
      slots, or E*C minus the kept ones under a capacity factor below 1. Used where rows
      stay on this process (the local dispatcher);
    - otherwise the kept count, read from the counts (one ``.item()``).
    """
    ids_TK = decision.expert_ids_TK
    num_tokens, top_k = ids_TK.shape
    flat = ids_TK.reshape(-1)
    valid_R = None
    if decision.dropless:
        order = torch.argsort(flat, stable=True)
        slot_idx_R = order
    else:
        # Empty / dropped slots (-1) sort after every expert and are cut off.
        order = torch.argsort(torch.where(flat >= 0, flat, torch.full_like(flat, num_experts)), stable=True)
        if static_rows and decision.kept_bound is not None:
            slot_idx_R = order[:min(flat.numel(), decision.kept_bound)]
            valid_R = torch.arange(slot_idx_R.numel(), device=flat.device) < decision.tokens_per_expert_E.sum()
        else:
            slot_idx_R = order[:int(decision.tokens_per_expert_E.sum().item())]
    token_idx_R = torch.div(slot_idx_R, top_k, rounding_mode="floor")
    row_of_slot_TK = gather_idx_R = None
    if inverse:
        rows = torch.arange(slot_idx_R.numel(), device=flat.device)
        if valid_R is not None:
            rows = torch.where(valid_R, rows, -1)
        # Dropless: every slot gets a row, so no -1 fill is needed.
        fill = torch.empty_like(flat) if decision.dropless else torch.full_like(flat, -1)
        row_of_slot_TK = fill.scatter_(0, slot_idx_R, rows).view(num_tokens, top_k)
        gather_idx_R = token_idx_R if valid_R is None else torch.where(valid_R, token_idx_R, -1)
    return SlotMap(num_tokens=num_tokens, top_k=top_k, slot_idx_R=slot_idx_R, token_idx_R=token_idx_R,
                   row_of_slot_TK=row_of_slot_TK, valid_R=valid_R, gather_idx_R=gather_idx_R)


@dataclass
class DispatchHandle:
    """What ``combine`` needs; opaque to everyone else except the two fields the experts read.

    tokens_per_local_expert_E: group sizes of the rows handed to the local experts.
    row_weights_R: the combine weight of each of those rows; the experts apply it.
    """

    slots: SlotMap
    tokens_per_local_expert_E: Tensor
    row_weights_R: Tensor
    use_kernels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Dispatcher(ABC):
    """Base class of dispatchers (see module docstring)."""

    num_experts: int
    num_local_experts: int
    local_expert_offset: int

    def run(self, x_TD: Tensor, decision: RoutingDecision, experts: ExpertBank) -> Tensor:
        """out_t = sum_k w_tk * expert_{e_tk}(x_t): the routed part of one MoE layer."""
        return self.run_rows(x_TD, decision, experts, impl=experts.impl_for(x_TD))

    def run_rows(self, x_TD: Tensor, decision: RoutingDecision, experts: ExpertBank, *, impl: str) -> Tensor:
        """The default pipeline: dispatch -> experts (weights applied there) -> combine. Rows
        travel in the experts' compute dtype (autocast's, under autocast)."""
        x_TD = x_TD.to(experts.compute_dtype(x_TD))
        x_RD, handle = self.dispatch(x_TD, decision, use_kernels=impl == "triton")
        y_RD = experts(x_RD, handle.tokens_per_local_expert_E, handle.row_weights_R, impl=impl)
        return self.combine(y_RD, handle)

    def run_all(self, x_TD: Tensor, experts: ExpertBank) -> Tensor:
        """Every expert (local or remote) on every local token, unweighted: y_ETD (for routers
        that score expert outputs, e.g. competition routing)."""
        num_tokens, num_experts = x_TD.shape[0], self.num_experts
        ids_TE = torch.arange(num_experts, device=x_TD.device).expand(num_tokens, num_experts).contiguous()
        decision = RoutingDecision(
            expert_ids_TK=ids_TE, weights_TK=torch.ones(num_tokens, num_experts, device=x_TD.device),
            tokens_per_expert_E=torch.full((num_experts,), num_tokens, dtype=torch.int64, device=x_TD.device),
            dropless=True)
        x_RD, handle = self.dispatch(x_TD, decision)
        y_RD = experts(x_RD, handle.tokens_per_local_expert_E)
        return self.unpermute(y_RD, handle).transpose(0, 1)

    @abstractmethod
    def dispatch(self, x_TD: Tensor, decision: RoutingDecision, *,
                 use_kernels: bool = False) -> tuple[Tensor, DispatchHandle]:
        """Rows for the local experts, grouped by local expert, and the handle."""

    @abstractmethod
    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """out_TD = sum over each token's (already weighted) rows."""

    @abstractmethod
    def unpermute(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """Per-slot rows y_TKD in slot order, zeros in empty slots."""


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


def permute(x_TD: Tensor, slots: SlotMap, *, use_kernels: bool = False) -> Tensor:
    """Gather token rows into routed order (deterministic backward); padding rows are zeros."""
    # A padding row would otherwise carry a dropped token into the last expert, which never
    # chose it: should that overflow, its zero combine weight times inf is NaN in the
    # backward (the expert's weight gradients). Zero input keeps every padding value finite.
    if use_kernels:
        from megamoe.kernels.rows import permute as permute_kernel

        # The gather kernel writes a zero row for index -1: no extra pass.
        return permute_kernel(x_TD, slots.gather_idx_R, slots.row_of_slot_TK)
    return _zero_padding(_Permute.apply(x_TD, slots.slot_idx_R, slots.top_k), slots)


def _zero_padding(t_RD: Tensor, slots: SlotMap) -> Tensor:
    """``t_RD`` with the padding rows (``SlotMap.valid_R`` False) set to exact zeros."""
    return t_RD if slots.valid_R is None else torch.where(slots.valid_R.unsqueeze(1), t_RD, 0)


def unpermute(y_RD: Tensor, slots: SlotMap) -> Tensor:
    """y_TKD with row r of y_RD at slot slot_idx_R[r]; zeros in empty slots (a padding row
    sits at a dropped slot: it is zeroed, whatever the experts made of it)."""
    y_RD = _zero_padding(y_RD, slots)
    num_slots = slots.num_tokens * slots.top_k
    # Dropless: every slot is written, so no zero fill is needed.
    alloc = y_RD.new_empty if slots.slot_idx_R.numel() == num_slots else y_RD.new_zeros
    y_full = alloc(num_slots, y_RD.shape[-1])
    y_full.index_copy_(0, slots.slot_idx_R, y_RD)
    return y_full.view(slots.num_tokens, slots.top_k, y_RD.shape[-1])


def combine_rows(y_RD: Tensor, slots: SlotMap, *, use_kernels: bool = False) -> Tensor:
    """out_t = sum of token t's routed rows (already weighted), deterministic on every device.

    Kernels: one gather-sum pass through the inverse slot map. Otherwise on CPU rows are
    accumulated with index_add_ (sequential per destination row, so deterministic, one pass);
    elsewhere through the per-slot buffer and a fixed-order reduction over K (no atomics).
    """
    if use_kernels:
        from megamoe.kernels.rows import combine as combine_kernel

        # Its backward gathers by token: padding rows (read by no slot) get zero gradients.
        return combine_kernel(y_RD, slots.gather_idx_R, slots.row_of_slot_TK)
    if y_RD.device.type == "cpu":
        # Padding rows: exact zeros whatever the experts made of them (unpermute does the same).
        y_RD = _zero_padding(y_RD, slots)
        return y_RD.new_zeros(slots.num_tokens, y_RD.shape[-1]).index_add_(0, slots.token_idx_R, y_RD)
    return unpermute(y_RD, slots).sum(1)


def row_weights(weights_TK: Tensor, slots: SlotMap) -> Tensor:
    """Combine weight of each routed row (differentiable); 0 on padding rows, which pass no
    gradient back to the router."""
    w_R = weights_TK.reshape(-1).index_select(0, slots.slot_idx_R)
    return w_R if slots.valid_R is None else torch.where(slots.valid_R, w_R, 0)


__all__ = ["DispatchHandle", "Dispatcher", "SlotMap", "combine_rows", "map_slots", "permute", "row_weights",
           "unpermute"]
