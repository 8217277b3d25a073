"""Expert parallelism: process groups, and sharding a model's experts across them.

Shape legend: E experts in a layer, E_local = E / ep_size experts held by one rank.

Layout (the same as DeepSpeed's default "expert before data" layout, so DeepSpeed's ZeRO
partitions expert parameters over the expert-data-parallel group):

- expert-parallel (EP) groups are blocks of consecutive ranks: world 4, ep_size 2 gives
  ``[0, 1], [2, 3]``. The ranks of one EP group hold disjoint slices of the experts and
  exchange tokens with all-to-all.
- expert-data-parallel (EDP) groups are strided: ``[0, 2], [1, 3]``. The ranks of one EDP
  group hold the same experts; expert gradients are reduced over this group only, dense
  gradients over the whole world.

Parallelism is applied after the single-device model is built (torchtitan style): build
the full model with the same seed on every rank, then :func:`apply_expert_parallel` keeps
this rank's expert slice and swaps in an all-to-all dispatcher. The sharded model then
computes exactly what the single-process model computes on the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.dispatch.all_to_all import AllToAllDispatcher

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's view of the EP x EDP layout (see the module docstring).

    ep_group / edp_group are None only in a single process without torch.distributed.
    """

    world_size: int
    ep_size: int
    ep_rank: int
    edp_size: int
    ep_group: ProcessGroup | None
    edp_group: ProcessGroup | None
    rank: int = 0
    edp_rank: int = 0

    @property
    def group_name(self) -> str:
        """The name DeepSpeed keys expert groups by (``param.group_name``)."""
        return expert_group_name(self.ep_size)

    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's EP group."""
        start = (self.rank // self.ep_size) * self.ep_size
        return list(range(start, start + self.ep_size))

    def edp_ranks(self) -> list[int]:
        """Global ranks of this rank's EDP group."""
        return list(range(self.rank % self.ep_size, self.world_size, self.ep_size))


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def ep_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """All EP groups: consecutive blocks of ``ep_size`` ranks."""
    return [list(range(s, s + ep_size)) for s in range(0, world_size, ep_size)]


def edp_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """All EDP groups: ranks with the same position inside their EP block."""
    return [list(range(i, world_size, ep_size)) for i in range(ep_size)]


def _check_ep_size(ep_size: int, world_size: int) -> None:
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} is invalid: must be a positive integer")
    if world_size % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} is invalid for world size {world_size}: the world size must be "
                         f"divisible by ep_size (valid ep_size values: "
                         f"{[d for d in range(1, world_size + 1) if world_size % d == 0]})")


def build_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the EP and EDP process groups. Collective: every rank must call it.

    Without an initialised process group only ``ep_size=1`` is possible (a single process).
    Raises ValueError for impossible layouts.
    """
    if not dist.is_available() or not dist.is_initialized():
        _check_ep_size(ep_size, 1)
        return ExpertParallelGroups(world_size=1, ep_size=1, ep_rank=0, edp_size=1, ep_group=None,
                                    edp_group=None, rank=0, edp_rank=0)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    _check_ep_size(ep_size, world_size)
    ep_group = edp_group = None
    # new_group is collective over the whole world: every rank creates every group, in the
    # same order, and keeps the one it belongs to.
    for ranks in ep_group_ranks(world_size, ep_size):
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for ranks in edp_group_ranks(world_size, ep_size):
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ExpertParallelGroups(world_size=world_size, ep_size=ep_size, ep_rank=rank % ep_size,
                                edp_size=world_size // ep_size, ep_group=ep_group, edp_group=edp_group,
                                rank=rank, edp_rank=rank // ep_size)


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every MoELayer in ``model``, in module order."""
    from megamoe.layer import MoELayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def mark_expert_params(module: nn.Module, group_name: str) -> None:
    """Tag parameters the way DeepSpeed recognises expert parameters.

    DeepSpeed treats a parameter with ``allreduce=False`` as an expert parameter and
    reduces (and ZeRO-partitions) it over the EDP group registered under ``group_name``.
    """
    for p in module.parameters():
        p.allreduce = False
        p.group_name = group_name


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


@torch.no_grad()
def _shard_expert_bank(bank: nn.Module, start: int, stop: int) -> None:
    for name, p in list(bank.named_parameters(recurse=False)):
        setattr(bank, name, nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad))
    bank.num_experts = stop - start


def apply_expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """Shard every MoELayer of ``model`` over ``groups`` (in place; returns ``model``).

    Each layer keeps experts ``[ep_rank * E_local, (ep_rank + 1) * E_local)`` and gets an
    :class:`AllToAllDispatcher` over ``groups.ep_group``. Expert parameters are tagged for
    DeepSpeed (``allreduce=False``, ``group_name``). Build the full model with the same seed
    on every rank before calling this, so the shards together equal the full model.
    Raises ValueError naming the layer when its experts do not divide by ``ep_size``.
    """
    layers = moe_layers(model)
    for name, layer in layers:
        num_experts = layer.config.num_experts
        if num_experts % groups.ep_size != 0:
            raise ValueError(f"MoE layer {name or '<root>'!r} has num_experts={num_experts}, which is not "
                             f"divisible by ep_size={groups.ep_size}; choose an ep_size dividing {num_experts}")
        if layer.dispatcher.num_local_experts != num_experts:
            raise ValueError(f"MoE layer {name or '<root>'!r} is already expert-parallel "
                             f"({layer.dispatcher!r}); apply_expert_parallel expects the full model")
    for _, layer in layers:
        dispatcher = AllToAllDispatcher(layer.config.num_experts, groups.ep_group)
        start = dispatcher.local_expert_offset
        _shard_expert_bank(layer.experts, start, start + dispatcher.num_local_experts)
        layer.dispatcher = dispatcher
        mark_expert_params(layer.experts, groups.group_name)
    return model


__all__ = ["ExpertParallelGroups", "build_expert_parallel_groups", "apply_expert_parallel", "moe_layers",
           "mark_expert_params", "is_expert_param", "expert_group_name", "ep_group_ranks", "edp_group_ranks"]
