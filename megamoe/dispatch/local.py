"""Single-process dispatch: a sort-based permute/unpermute with a deterministic combine.

Shape legend: T tokens, D hidden size, K slots per token, R kept slots, E experts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megamoe.dispatch.base import DispatchHandle, combine_rows, permute, row_weights, sort_slots, unpermute
from megamoe.routing.base import RoutingDecision


class LocalDispatcher:
    """All experts live in this process. Rows are grouped by expert via a stable sort."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.local_expert_offset = 0

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, DispatchHandle]:
        ids_TK = decision.expert_ids_TK
        slot_idx_R = sort_slots(ids_TK, decision.tokens_per_expert_E, self.num_experts)
        x_RD = permute(x_TD, slot_idx_R, ids_TK.shape[1])
        handle = DispatchHandle(num_tokens=x_TD.shape[0], top_k=ids_TK.shape[1], slot_idx_R=slot_idx_R,
                                weights_TK=decision.weights_TK,
                                tokens_per_local_expert_E=decision.tokens_per_expert_E,
                                row_weights_R=row_weights(decision.weights_TK, slot_idx_R))
        return x_RD, handle

    def run_experts(self, x_TD: Tensor, decision: RoutingDecision, experts) -> Tensor | None:
        """dispatch + experts + combine in one fused pass when ``experts`` supports it
        (the CPU loop path: no [R, D] permuted copies); None otherwise."""
        if not experts.supports_token_forward(x_TD):
            return None
        ids_TK = decision.expert_ids_TK
        slot_idx_R = sort_slots(ids_TK, decision.tokens_per_expert_E, self.num_experts)
        token_idx_R = torch.div(slot_idx_R, ids_TK.shape[1], rounding_mode="floor")
        return experts.forward_tokens(x_TD, token_idx_R, decision.tokens_per_expert_E,
                                      row_weights(decision.weights_TK, slot_idx_R))

    def unpermute(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        return unpermute(y_RD, handle.slot_idx_R, handle.num_tokens, handle.top_k)

    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        weights = None if handle.row_weights_R is not None else handle.weights_TK
        return combine_rows(y_RD, handle.slot_idx_R, weights, num_tokens=handle.num_tokens, top_k=handle.top_k)

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"
