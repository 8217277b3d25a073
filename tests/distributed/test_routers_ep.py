"""Routers other than top-k under expert parallelism: an EP=2 MoELayer (2 real gloo processes,
each holding half the tokens, experts sharded with apply_expert_parallel) computes what the
single-process EP=1 layer computes.

- ``compete`` (every step a competition step: warmup_steps=0, compete_prob=1.0): the router
  runs every expert on its tokens through ``Dispatcher.run_all`` (the
  all-to-all path to remote experts). Reference: the full layer on each rank's half, chunk
  losses summed (data-parallel semantics; the MSE router loss is a per-rank mean).
- ``expert_choice``: capacity is per rank under EP (each rank's experts pick among that rank's
  tokens), so the reference routes each rank's half separately through the full layer; it is
  *not* the layer on the concatenated batch.
- ``stochastic`` (granularity ``batch``): every rank seeds its draws identically (seed_draws), so
  every rank picks the same expert, which is exactly the single process's one draw for the
  concatenated global batch. Reference: one call on the whole batch.
- ``skip`` (capacity factor 0.5, so tokens are skipped and Horvitz-Thompson weights exceed 1) and
  ``balanced`` (groups of 4 local tokens): trained through ``estimator_loss`` (pathwise +
  score-function gradient) for two steps, so the second step uses a non-zero EMA baseline.
  Semantics under EP (megamoe/routing/estimators.py): each rank routes its own tokens with a
  per-rank capacity / grouping, its own baseline and its own draws; ``seed_estimator_draws``
  seeds each rank's generator from (seed, router, rank). Reference: one fresh copy of the layer
  per rank, seeded with that rank's seed, run on that rank's tokens; gradients summed over copies.

Outputs, input gradients, router gradients (summed over ranks) and every expert's gradient
(assembled from the shards) must match. fp32, rtol=1e-4, atol=1e-5.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from megamoe.config import ExpertConfig, MoEConfig, RouterConfig
from megamoe.layer import MoELayer
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from megamoe.train.objectives import estimator_loss
from megamoe.routing.estimators import seed_estimator_draws
from megamoe.routing.stochastic import seed_draws
from megamoe.testing import run_distributed

pytestmark = pytest.mark.distributed

WORLD, TOKENS_PER_RANK, HIDDEN, EXPERTS, SEED = 2, 10, 16, 4, 11
TOL = dict(rtol=1e-4, atol=1e-5)
ROUTERS = {
    "compete": RouterConfig(name="compete", top_k=2, aux_loss_coef=0.0,
                            options={"warmup_steps": 0, "compete_prob": 1.0, "mse_coef": 0.5}),
    "expert_choice": RouterConfig(name="expert_choice", top_k=1, aux_loss_coef=0.0, options={"capacity_factor": 1.0}),
    "stochastic": RouterConfig(name="stochastic", top_k=1, aux_loss_coef=0.0, options={"granularity": "batch"}),
    "skip": RouterConfig(name="skip", top_k=1, aux_loss_coef=0.0, options={"capacity_factor": 0.5}),
    "balanced": RouterConfig(name="balanced", top_k=1, aux_loss_coef=0.0, options={"group_size": 4}),
}
ESTIMATORS = ("skip", "balanced")
STEPS = 2  # estimator routers: the second step runs with a non-zero EMA baseline


def make_case(name: str) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    cfg = MoEConfig(hidden_size=HIDDEN, num_experts=EXPERTS, router=ROUTERS[name],
                    experts=ExpertConfig(intermediate_size=8, activation="swiglu", impl="loop"))
    layer = MoELayer(cfg)
    steps = STEPS if name in ESTIMATORS else 1
    x = torch.randn(steps, WORLD * TOKENS_PER_RANK, HIDDEN).squeeze(0)
    g = torch.randn(steps, WORLD * TOKENS_PER_RANK, HIDDEN).squeeze(0)
    if name == "stochastic":
        seed_draws(layer, SEED)
    return layer, x, g


def _chunk(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[..., rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK, :]


def _estimator_steps(layer: MoELayer, x_local: torch.Tensor, g_local: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """STEPS forward/backward passes through estimator_loss (grads accumulate). Returns the
    outputs [STEPS, T, D] and per-step statistics."""
    outs, stats = [], []
    for step in range(STEPS):
        out = layer(x_local[step])
        token_loss = (out * g_local[step]).sum(-1)
        estimator_loss(layer, token_loss, reduction="sum").backward()
        outs.append(out.detach())
        stats.append({k: v for k, v in layer.last_stats.as_floats().items() if k != "assignment_seconds"})
    return torch.stack(outs), {"stats": stats, "baseline": float(layer.router.baseline_value)}


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
        extra: dict = {}
        if name in ESTIMATORS:
            assert seed_estimator_draws(layer, SEED) == 1  # rank taken from torch.distributed
            out, extra = _estimator_steps(layer, x_local, _chunk(g, rank))
        else:
            out = layer(x_local)
            (out * _chunk(g, rank)).sum().backward()
            out = out.detach()
        results[name] = {"out": out, "gx": x_local.grad, **_grads(layer), **extra,
                         "offset": layer.dispatcher.local_expert_offset,
                         "competition": layer.last_stats.extra.get("competition")}
    dist.barrier()
    return results


def _reference(name: str) -> dict:
    layer, x, g = make_case(name)
    x = x.clone().requires_grad_(True)
    if name in ESTIMATORS:
        # One independent replica per rank (own capacity, baseline and draws); grads summed.
        outs, gx, grads, extras = [], [], [], []
        for r in range(WORLD):
            replica = copy.deepcopy(layer)
            seed_estimator_draws(replica, SEED, rank=r)
            x_r = _chunk(x, r).detach().clone().requires_grad_(True)
            out, extra = _estimator_steps(replica, x_r, _chunk(g, r))
            outs.append(out)
            gx.append(x_r.grad)
            grads.append(_grads(replica))
            extras.append(extra)
        summed = {k: {n: sum(gr[k][n] for gr in grads) for n in grads[0][k]} for k in ("router", "experts")}
        return {"out": outs, "gx": torch.cat(gx, dim=-2), **summed, "extras": extras}
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
    if name in ESTIMATORS:
        for rank, got in enumerate(results):
            want = ref["extras"][rank]
            assert got["baseline"] == pytest.approx(want["baseline"], rel=1e-5)
            assert len(got["stats"]) == len(want["stats"])
            for got_stats, want_stats in zip(got["stats"], want["stats"]):  # approx takes flat mappings only
                assert got_stats == pytest.approx(want_stats, rel=1e-5, abs=1e-6)
        if name == "skip":  # the test must exercise skipping and Horvitz-Thompson weights > 1
            assert all(st["skipped_fraction"] > 0 and st["max_ht_weight"] > 1
                       for r in results for st in r["stats"])
        # ranks draw independently: identical routing on both ranks would hide a rank mix-up
        assert not torch.equal(results[0]["out"], results[1]["out"])
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
