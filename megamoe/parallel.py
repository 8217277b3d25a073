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

:func:`init_distributed` starts the default process group the way every entry point needs
it: it joins a launcher's group (torchrun, the deepspeed launcher and SLURM + torchrun set
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``), and in a process that no
launcher started it makes a one-process group on a free local port, so code written for
DeepSpeed or expert parallelism also runs as a plain ``python script.py``.
:func:`cuda_device_for_rank` maps a local rank to its GPU and refuses more ranks than GPUs.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from megamoe.dispatch.all_to_all import AllToAllDispatcher
from megamoe.stats import named_moe_layers

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_BACKENDS = ("auto", "gloo", "nccl")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_dist_backend(choice: str, *, device_type: str) -> str:
    """``auto`` -> ``nccl`` for CUDA devices, ``gloo`` otherwise; ``gloo``/``nccl`` are kept.

    Raises ValueError for an unknown name, and for ``nccl`` without a CUDA device (NCCL only
    moves GPU tensors).
    """
    if choice not in DIST_BACKENDS:
        raise ValueError(f"dist_backend={choice!r} is invalid: allowed values are "
                         f"{', '.join(map(repr, DIST_BACKENDS))}")
    if choice == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if choice == "nccl" and device_type != "cuda":
        raise ValueError("dist_backend='nccl' needs CUDA devices, but this process runs on the CPU; use "
                         "dist_backend 'auto' (gloo on CPU) or 'gloo'")
    return choice


def launcher_world_size() -> int | None:
    """WORLD_SIZE set by a launcher (torchrun, deepspeed, SLURM + torchrun), else None."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def cuda_device_for_rank(local_rank: int, device_count: int) -> int:
    """The CUDA device index of the process with ``local_rank`` on its node: one GPU per rank.

    Raises ValueError when the node has fewer visible GPUs than the rank needs, instead of
    the CUDA "invalid device ordinal" error (or several ranks silently sharing one GPU).
    """
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} is invalid: must be >= 0")
    if local_rank >= device_count:
        raise ValueError(f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but {device_count} CUDA device(s) are "
                         f"visible: start at most {device_count} process(es) per node (one per GPU), or run on the "
                         "CPU (CUDA_VISIBLE_DEVICES= with the gloo backend)")
    return local_rank


def init_distributed(*, backend: str = "auto", device_type: str | None = None,
                     timeout: timedelta = timedelta(minutes=30)) -> None:
    """Start the default process group if none exists (every rank calls it).

    Under a launcher (``WORLD_SIZE`` set) this joins its group through the environment;
    ``WORLD_SIZE`` without ``MASTER_ADDR``/``MASTER_PORT``/``RANK`` is an error naming what is
    missing. Otherwise the process is alone: it sets ``RANK=0``, ``LOCAL_RANK=0``,
    ``WORLD_SIZE=1``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` (what a launcher
    would set, and what DeepSpeed reads) and makes a one-process group.
    backend: ``auto`` (nccl for CUDA, gloo on CPU), ``gloo`` or ``nccl``.
    device_type: the device this rank computes on (default: ``cuda`` when available).
    """
    if dist.is_initialized():
        return
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    name = resolve_dist_backend(backend, device_type=device_type)
    if launcher_world_size() is None:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not: start the "
                         "processes with a launcher (torchrun, deepspeed, launch/*.sh), which sets all of them")
    dist.init_process_group(name, timeout=timeout)


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
    Raises ValueError for impossible layouts, and when a launcher started several processes
    (``WORLD_SIZE`` > 1) but this one has no process group yet.
    """
    if not dist.is_available() or not dist.is_initialized():
        launched = launcher_world_size()
        if launched is not None and launched > 1:
            raise ValueError(f"WORLD_SIZE={launched} is set (a launcher started {launched} processes), but "
                             "torch.distributed is not initialised in this process: call "
                             "megamoe.parallel.init_distributed() (or deepspeed.init_distributed()) on every rank "
                             "before build_expert_parallel_groups")
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


def apply_expert_parallel(model: nn.Module, groups: ExpertParallelGroups, *,
                          layers: Sequence[tuple[str, nn.Module]] | None = None) -> nn.Module:
    """Shard every MoELayer of ``model`` over ``groups`` (in place; returns ``model``).

    Each layer keeps experts ``[ep_rank * E_local, (ep_rank + 1) * E_local)`` and gets an
    :class:`AllToAllDispatcher` over ``groups.ep_group``. Expert parameters are tagged for
    DeepSpeed (``allreduce=False``, ``group_name``). Build the full model with the same seed
    on every rank before calling this, so the shards together equal the full model.
    Raises ValueError naming the layer when its experts do not divide by ``ep_size``.
    ``layers``: ``(name, layer)`` of the model's MoE layers when the caller has found them
    already (``megamoe.stats.named_moe_layers``; the train job's step state has).
    """
    layers = list(layers) if layers is not None else named_moe_layers(model)
    for name, layer in layers:
        num_experts = layer.config.num_experts
        if num_experts % groups.ep_size != 0:
            raise ValueError(f"MoE layer {name or '<root>'!r} has num_experts={num_experts}, which is not "
                             f"divisible by ep_size={groups.ep_size}; choose an ep_size dividing {num_experts}")
        if layer.dispatcher.num_local_experts != num_experts:
            raise ValueError(f"MoE layer {name or '<root>'!r} is already expert-parallel "
                             f"({layer.dispatcher!r}); apply_expert_parallel expects the full model")
    for _, layer in layers:
        layer.shard_experts(AllToAllDispatcher(layer.config.num_experts, groups.ep_group))
        mark_expert_params(layer.experts, groups.group_name)
    return model


__all__ = ["ExpertParallelGroups", "build_expert_parallel_groups", "init_distributed", "resolve_dist_backend",
           "cuda_device_for_rank", "launcher_world_size", "free_port", "apply_expert_parallel",
           "mark_expert_params", "is_expert_param", "expert_group_name", "ep_group_ranks", "edp_group_ranks"]
