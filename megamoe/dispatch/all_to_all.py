"""Expert-parallel dispatch: token slots travel to the rank holding their expert and back.

Shape legend: T local tokens, D hidden size, K slots per token, E experts (global),
W ranks in the expert-parallel group, L = E / W local experts, S slots this rank sends
(kept slots, sorted by global expert), R rows this rank receives (grouped by local expert).

One ``dispatch`` is: sort kept slots by global expert (which also groups them by
destination rank), exchange the per-expert counts with one small ``all_to_all_single``,
send the rows (and, in a second small exchange, their fp32 combine weights, which the
experts apply) with a variable-split ``all_to_all_single``, and regroup the received rows
by local expert (rows of one expert stay ordered by source rank, then token). ``combine``
runs the inverse path and adds each token's returned (already weighted) rows; with the
``triton`` experts the local permute and that final sum are the Triton kernels. Both
exchanges are autograd functions whose backward is the reverse exchange, so every rank takes
part in every backward collective in the same order as in forward.

Dropless and capacity modes share this path: the router has already marked dropped
slots with -1, they are never sent, and the splits are whatever the kept counts are.
A rank or expert with zero tokens sends or receives zero-length splits; the counts
exchange always happens, so no rank waits on a collective another rank skipped.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megamoe.dispatch.base import (DispatchHandle, Dispatcher, combine_rows, map_slots, permute, row_weights,
                                   unpermute)
from megamoe.routing.base import RoutingDecision


class _AllToAll(torch.autograd.Function):
    """Variable-split all-to-all; backward sends gradients back along the same splits."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _exchange(x_SD, output_splits=output_splits, input_splits=input_splits, group=group)

    @staticmethod
    def backward(ctx, g_RD: Tensor):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        g = _exchange(g_RD, output_splits=input_splits, input_splits=output_splits, group=ctx.group)
        return g, None, None, None


def _exchange(x: Tensor, *, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits,
                           group=group)
    return out


def all_to_all(x: Tensor, *, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Autograd-aware ``all_to_all_single`` with variable splits along dim 0."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class AllToAllDispatcher(Dispatcher):
    """Experts are sharded over ``group``: rank w of the group holds experts [w*L, (w+1)*L).

    ``group=None`` means the default (world) group. With a group of one rank this is the
    local sort-based dispatch without any communication. ``run`` is the default
    dispatch -> experts -> combine of :class:`Dispatcher`.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None) -> None:
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.ep_size = dist.get_world_size(group)
            self.ep_rank = dist.get_rank(group)
        elif group is None:
            self.ep_size, self.ep_rank = 1, 0
        else:
            raise ValueError("AllToAllDispatcher was given a process group but torch.distributed is not initialised")
        if num_experts % self.ep_size != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel group size "
                             f"{self.ep_size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.local_expert_offset = self.ep_rank * self.num_local_experts

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision, *,
                 use_kernels: bool = False) -> tuple[Tensor, DispatchHandle]:
        slots = map_slots(decision, self.num_experts, inverse=use_kernels)
        counts_E = decision.tokens_per_expert_E.to(torch.int64)
        x_SD = permute(x_TD, slots, use_kernels=use_kernels)
        # Combine weights travel with their rows: the experts apply them (see Dispatcher).
        w_S = row_weights(decision.weights_TK, slots)
        handle = DispatchHandle(slots=slots, tokens_per_local_expert_E=counts_E, row_weights_R=w_S,
                                use_kernels=use_kernels)
        if self.ep_size == 1:
            return x_SD, handle

        world, local = self.ep_size, self.num_local_experts
        # counts_recv_WL[w, l]: slots rank w sends to my local expert l.
        counts_recv_WL = torch.empty_like(counts_E)
        dist.all_to_all_single(counts_recv_WL, counts_E.contiguous(), group=self.group)
        counts_recv_WL = counts_recv_WL.view(world, local)
        # One host sync for both split lists (they size the exchange buffers).
        splits = torch.stack([counts_E.view(world, local).sum(1), counts_recv_WL.sum(1)]).cpu().tolist()
        send_splits, recv_splits = splits[0], splits[1]
        x_recv = all_to_all(x_SD, output_splits=recv_splits, input_splits=send_splits, group=self.group)
        w_recv = all_to_all(w_S.float(), output_splits=recv_splits, input_splits=send_splits, group=self.group)

        # Received rows are ordered (source rank, local expert, token); experts need them
        # grouped by local expert. A stable sort on the local expert id keeps source order.
        expert_of_row = torch.arange(local, device=x_TD.device).repeat(world).repeat_interleave(
            counts_recv_WL.reshape(-1).to(x_TD.device), output_size=x_recv.shape[0])
        order_R = torch.argsort(expert_of_row, stable=True)
        x_RD = x_recv.index_select(0, order_R)
        handle.row_weights_R = w_recv.index_select(0, order_R)
        handle.tokens_per_local_expert_E = counts_recv_WL.sum(0)
        handle.extra.update(order_R=order_R, send_splits=send_splits, recv_splits=recv_splits)
        return x_RD, handle

    def _return_rows(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """Expert outputs back on the ranks that sent the slots, in sent (slot-sorted) order."""
        if self.ep_size == 1:
            return y_RD
        y_recv = _unsort(y_RD, handle.extra["order_R"])
        return all_to_all(y_recv, output_splits=handle.extra["send_splits"],
                          input_splits=handle.extra["recv_splits"], group=self.group)

    def unpermute(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        return unpermute(self._return_rows(y_RD, handle), handle.slots)

    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """out_TD: each token's returned rows (weighted by the experts) added up."""
        return combine_rows(self._return_rows(y_RD, handle), handle.slots, use_kernels=handle.use_kernels)

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank})")


def _unsort(y_RD: Tensor, order_R: Tensor) -> Tensor:
    """Inverse of ``y_RD = y[order_R]`` (differentiable: a gather by the inverse permutation)."""
    inverse = torch.empty_like(order_R)
    inverse[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return y_RD.index_select(0, inverse)


__all__ = ["AllToAllDispatcher", "all_to_all"]
