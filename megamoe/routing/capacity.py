"""Expert capacity: how many slots an expert keeps, and which ones it drops.

Shape legend: T tokens, E experts, K slots per token.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from megamoe.routing.base import counts_per_expert


def expert_capacity(num_tokens: int, *, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(T * K / E * capacity_factor)."""
    return int(math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def apply_capacity(expert_ids_TK: Tensor, scores_TK: Tensor, *, num_experts: int, capacity: int,
                   policy: str) -> Tensor:
    """Return a bool keep-mask [T, K]: each expert keeps at most ``capacity`` slots.

    policy ``probs``: an over-full expert keeps its highest-scoring slots (ties: earliest).
    policy ``position``: it keeps the earliest tokens (ties within a token: lower k first).
    Slots with expert id -1 are never kept.
    """
    num_tokens, top_k = expert_ids_TK.shape
    flat_ids = expert_ids_TK.reshape(-1)
    valid = flat_ids >= 0
    n = flat_ids.numel()
    if policy == "probs":
        # Stable sort by descending score keeps earlier slots first among equal scores.
        priority = torch.argsort(-scores_TK.detach().reshape(-1).float(), stable=True)
    elif policy == "position":
        priority = torch.arange(n, device=flat_ids.device)
    else:
        raise ValueError(f"unknown drop policy {policy!r}; expected 'probs' or 'position'")
    ids_in_priority = torch.where(valid, flat_ids, num_experts)[priority]
    # Stable sort by expert keeps priority order within each expert's segment.
    by_expert = torch.argsort(ids_in_priority, stable=True)
    sorted_ids = ids_in_priority[by_expert]
    counts = counts_per_expert(sorted_ids, num_experts + 1)  # bin E: the invalid slots
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=flat_ids.device) - starts[sorted_ids]
    keep_sorted = (rank < capacity) & (sorted_ids < num_experts)
    keep = torch.zeros(n, dtype=torch.bool, device=flat_ids.device)
    keep[priority[by_expert]] = keep_sorted
    return keep.view(num_tokens, top_k)
