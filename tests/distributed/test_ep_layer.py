"""Expert-parallel MoELayer == single-process MoELayer (real gloo processes).

Each rank holds a chunk of the global batch. The reference runs the full (unsharded)
layer in this process on each chunk and sums the chunk losses, which is what data
parallelism computes. Outputs, input gradients, router gradients and every expert's
weight gradient must match, dropless and with capacity drops, for EP=2 (world 2),
EP=4 (world 4) and EP=2 x EDP=2 (world 4), including forced routings where a rank sends
every token to remote experts and most experts (and whole ranks) receive nothing.

Tolerance: fp32, rtol=1e-4, atol=1e-5 (the sharded run sums expert rows in a different
grouping, so results agree to rounding, not bitwise).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from tiny_model import moe_config

from megamoe.layer import MoELayer

TOKENS_PER_RANK, HIDDEN, EXPERTS = 12, 16, 8
CASES = ("dropless", "capacity", "all_remote")
TOL = dict(rtol=1e-4, atol=1e-5)


def make_case(case: str, world: int) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    """The full layer, the global input x [world*T, D] and the output cotangent g."""
    torch.manual_seed(7)
    cap = 1.0 if case == "capacity" else None
    layer = MoELayer(moe_config(hidden=HIDDEN, inter=8, experts=EXPERTS, top_k=2, capacity_factor=cap))
    x = torch.randn(world * TOKENS_PER_RANK, HIDDEN)
    g = torch.randn(world * TOKENS_PER_RANK, HIDDEN)
    if case == "all_remote":
        # Every token prefers experts 4 and 5 (held by the last half of the ranks): rank 0
        # sends everything away, experts 0-3 and 6-7 get no tokens, ranks holding only
        # those receive zero rows.
        v = torch.randn(HIDDEN)
        v = v / v.norm()
        scale = torch.tensor([-1.0, -1.0, -1.0, -1.0, 2.0, 1.5, -1.0, -1.0])
        with torch.no_grad():
            layer.router.weight.copy_(scale[:, None] * v[None, :] * 4.0)
        x = v[None, :] * 3.0 + 0.01 * x
    return layer, x, g


def _chunk(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK]


def worker(rank: int, world: int, ep_sizes: tuple[int, ...]) -> dict:
    return {ep: _run_cases(rank, world, ep) for ep in ep_sizes}


def _run_cases(rank: int, world: int, ep_size: int) -> dict:
    groups = build_expert_parallel_groups(ep_size)
    results = {}
    for case in CASES:
        layer, x, g = make_case(case, world)
        apply_expert_parallel(layer, groups)
        x_local = _chunk(x, rank).clone().requires_grad_(True)
        out = layer(x_local)
        (out * _chunk(g, rank)).sum().backward()
        results[case] = {
            "out": out.detach(), "gx": x_local.grad, "router": layer.router.weight.grad,
            "experts": {n: p.grad.clone() for n, p in layer.experts.named_parameters()},
            "offset": layer.dispatcher.local_expert_offset,
            "local_experts": layer.experts.num_experts,
        }
    dist.barrier()
    return results


def _reference(case: str, world: int) -> dict:
    layer, x, g = make_case(case, world)
    x = x.clone().requires_grad_(True)
    outs = []
    for r in range(world):
        out = layer(_chunk(x, r))
        (out * _chunk(g, r)).sum().backward()
        outs.append(out.detach())
    return {"out": outs, "gx": x.grad, "router": layer.router.weight.grad,
            "experts": {n: p.grad for n, p in layer.experts.named_parameters()}}


def _check(results: list[dict], world: int, ep_size: int) -> None:
    for case in CASES:
        ref = _reference(case, world)
        router_sum = sum(r[case]["router"] for r in results)
        torch.testing.assert_close(router_sum, ref["router"], **TOL)
        full = {n: torch.zeros_like(t) for n, t in ref["experts"].items()}
        for rank, res in enumerate(results):
            got = res[case]
            assert got["local_experts"] == EXPERTS // ep_size
            torch.testing.assert_close(got["out"], ref["out"][rank], **TOL)
            torch.testing.assert_close(got["gx"], _chunk(ref["gx"], rank), **TOL)
            off = got["offset"]
            assert off == (rank % ep_size) * (EXPERTS // ep_size)
            for n, grad in got["experts"].items():
                # Ranks of one EDP group hold the same experts: their grads add up.
                full[n][off:off + grad.shape[0]] += grad
        for n in full:
            torch.testing.assert_close(full[n], ref["experts"][n], **TOL, msg=lambda m: f"{case} {n}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("world,ep_sizes", [(2, (2,)), (4, (4, 2))])
def test_ep_layer_matches_single_process(world: int, ep_sizes: tuple[int, ...], ep_runs) -> None:
    results = [r["layer"] for r in ep_runs(world)]
    for ep_size in ep_sizes:
        _check([r[ep_size] for r in results], world, ep_size)


def test_all_remote_case_really_starves_experts() -> None:
    layer, x, _ = make_case("all_remote", 2)
    decision = layer.router(x)
    assert set(decision.expert_ids_TK.unique().tolist()) == {4, 5}
