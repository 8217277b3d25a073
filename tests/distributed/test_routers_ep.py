"""Routers other than top-k under expert parallelism: an EP=2 MoELayer (2 real gloo processes,
each holding half the tokens, experts sharded with apply_expert_parallel) computes what the
single-process EP=1 layer computes.

- ``compete`` (every step a competition step: warmup_steps=0, compete_prob=1.0): the router
  runs every expert on its tokens through ``MoELayer._compute_all_experts_dispatched`` (the
  all-to-all path to remote experts). Reference: the full layer on each rank's half, chunk
  losses summed (data-parallel semantics; the MSE router loss is a per-rank mean).
- ``expert_choice``: capacity is per rank under EP (each rank's experts pick among that rank's
  tokens), so the reference routes each rank's half separately through the full layer; it is
  *not* the layer on the concatenated batch.
- ``stochastic`` (granularity ``batch``): every rank seeds its draws identically (seed_draws), so
  every rank picks the same expert, which is exactly the single process's one draw for the
  concatenated global batch. Reference: one call on the whole batch.

Outputs, input gradients, router gradients (summed over ranks) and every expert's gradient
(assembled from the shards) must match. fp32, rtol=1e-4, atol=1e-5.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.config import ExpertConfig, MoEConfig, RouterConfig
from megamoe.layer import MoELayer
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from megamoe.routing.stochastic import seed_draws
from megamoe.testing import run_distributed

pytestmark = pytest.mark.distributed

WORLD, TOKENS_PER_RANK, HIDDEN, EXPERTS, SEED = 2, 10, 16, 4, 11
TOL = dict(rtol=1e-4, atol=1e-5)
ROUTERS = {
    "compete": RouterConfig(name="compete", top_k=2, aux_loss_coef=0.0,
                            options={"warmup_steps": 0, "compete_prob": 1.0, "mse_coef": 0.5}),
    "expert_choice": RouterConfig(name="expert_choice", top_k=1, aux_loss_coef=0.0, capacity_factor=1.0),
    "stochastic": RouterConfig(name="stochastic", top_k=1, aux_loss_coef=0.0, options={"granularity": "batch"}),
}


def make_case(name: str) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    cfg = MoEConfig(hidden_size=HIDDEN, num_experts=EXPERTS, router=ROUTERS[name],
                    experts=ExpertConfig(intermediate_size=8, activation="swiglu", impl="loop"))
    layer = MoELayer(cfg)
    x = torch.randn(WORLD * TOKENS_PER_RANK, HIDDEN)
    g = torch.randn(WORLD * TOKENS_PER_RANK, HIDDEN)
    if name == "stochastic":
        seed_draws(layer, SEED)
    return layer, x, g


def _chunk(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK]


def _grads(layer: MoELayer) -> dict:
    return {"router": {n: p.grad.clone() for n, p in layer.router.named_parameters()},
            "experts": {n: p.grad.clone() for n, p in layer.experts.named_parameters()}}


def worker(rank: int, world: int) -> dict:
    groups = build_expert_parallel_groups(world)
    results = {}
    for name in ROUTERS:
        layer, x, g = make_case(name)
        apply_expert_parallel(layer, groups)
        x_local = _chunk(x, rank).clone().requires_grad_(True)
        out = layer(x_local)
        (out * _chunk(g, rank)).sum().backward()
        results[name] = {"out": out.detach(), "gx": x_local.grad, **_grads(layer),
                         "offset": layer.dispatcher.local_expert_offset,
                         "competition": layer.last_stats.extra.get("competition")}
    dist.barrier()
    return results


def _reference(name: str) -> dict:
    layer, x, g = make_case(name)
    x = x.clone().requires_grad_(True)
    if name == "stochastic":
        out = layer(x)
        (out * g).sum().backward()
        outs = [_chunk(out.detach(), r) for r in range(WORLD)]
    else:
        outs = []
        for r in range(WORLD):
            out = layer(_chunk(x, r))
            (out * _chunk(g, r)).sum().backward()
            outs.append(out.detach())
    return {"out": outs, "gx": x.grad, **_grads(layer)}


@pytest.fixture(scope="module")
def ep_results() -> list[dict]:
    return run_distributed(worker, WORLD)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_ep2_matches_single_process(name: str, ep_results: list[dict]) -> None:
    ref = _reference(name)
    results = [r[name] for r in ep_results]
    if name == "compete":
        assert all(float(r["competition"]) == 1.0 for r in results), "the test must run competition steps"
    for n, grad in ref["router"].items():
        torch.testing.assert_close(sum(r["router"][n] for r in results), grad, **TOL)
    full = {n: torch.zeros_like(t) for n, t in ref["experts"].items()}
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["out"], ref["out"][rank], **TOL)
        torch.testing.assert_close(got["gx"], _chunk(ref["gx"], rank), **TOL)
        off = got["offset"]
        assert off == rank * (EXPERTS // WORLD)
        for n, grad in got["experts"].items():
            full[n][off:off + grad.shape[0]] += grad
    for n in full:
        torch.testing.assert_close(full[n], ref["experts"][n], **TOL, msg=lambda m: f"{name} {n}: {m}")


def test_expert_choice_capacity_is_per_rank() -> None:
    """The per-rank reference above matters: routing the concatenated batch at once picks
    other tokens than routing each rank's half (so EP expert_choice is not the global layer)."""
    layer, x, _ = make_case("expert_choice")
    with torch.no_grad():
        whole = layer(x)
        halves = torch.cat([layer(_chunk(x, r)) for r in range(WORLD)])
    assert not torch.allclose(whole, halves, **TOL)
