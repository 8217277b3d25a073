"""Single-process dispatch: a sort-based permute with a deterministic combine.

Shape legend: T tokens, D hidden size, K slots per token, R kept slots, E experts.

``run`` picks one of two pipelines from the experts' implementation:
- ``loop`` on CPU: dispatch, experts and combine fused into one pass per expert segment
  (rows gathered straight from x_TD, weighted outputs scatter-added straight into out_TD;
  see ``ExpertBank.forward_tokens``): no [R, D] permuted copy or per-row output exists.
- otherwise the default dispatch -> experts -> combine (``Dispatcher.run_rows``), with the
  Triton permute / combine kernels when the experts run ``triton``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from megamoe.dispatch.base import (DispatchHandle, Dispatcher, combine_rows, map_slots, permute, row_weights,
                                   unpermute)
from megamoe.routing.base import RoutingDecision

if TYPE_CHECKING:
    from megamoe.experts import ExpertBank


class LocalDispatcher(Dispatcher):
    """All experts live in this process. Rows are grouped by expert via a stable sort."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.local_expert_offset = 0

    def run(self, x_TD: Tensor, decision: RoutingDecision, experts: ExpertBank) -> Tensor:
        impl = experts.impl_for(x_TD)
        if impl == "loop" and x_TD.device.type == "cpu":
            slots = map_slots(decision, self.num_experts)
            return experts.forward_tokens(x_TD, slots.token_idx_R, decision.tokens_per_expert_E,
                                          row_weights(decision.weights_TK, slots))
        return self.run_rows(x_TD, decision, experts, impl=impl)

    def run_all(self, x_TD: Tensor, experts: ExpertBank) -> Tensor:
        return experts.forward_all(x_TD)

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision, *,
                 use_kernels: bool = False) -> tuple[Tensor, DispatchHandle]:
        # Rows stay in this process, so a decision that bounds its kept slots is padded to the
        # bound instead of read back from the device (see map_slots).
        slots = map_slots(decision, self.num_experts, inverse=use_kernels, static_rows=True)
        x_RD = permute(x_TD, slots, use_kernels=use_kernels)
        handle = DispatchHandle(slots=slots, tokens_per_local_expert_E=slots.group_sizes(decision.tokens_per_expert_E),
                                row_weights_R=row_weights(decision.weights_TK, slots), use_kernels=use_kernels)
        return x_RD, handle

    def unpermute(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        return unpermute(y_RD, handle.slots)

    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        return combine_rows(y_RD, handle.slots, use_kernels=handle.use_kernels)

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"
