"""ALF-LB under expert parallelism (4 real gloo processes): EP=2 x EDP=2 and EP=4 layouts.

Every rank takes one micro-batch of each step's global batch and trains the sharded model
(apply_expert_parallel) with SGD; gradients are reduced by hand the way the layout requires
(dense parameters over the world, expert shards over their EDP group, both divided by the
world size, which is the gradient of the mean loss over the concatenated batch). The
MoEStepState counts each rank's own routing decisions and all-reduces them over the world.
After a few update() steps its biases must equal those one process computes on the
concatenated batches with the unsharded model, and be bitwise identical on every rank.
Routing happens before dispatch, so the counts are the same whatever the dispatcher is; the
test guards the combination (experts elsewhere, routers and balancer everywhere). The model
and the reference come from test_balancing_dist.py; fp64. A third case runs the DeepSpeed
engine (ZeRO-2, EP=2 x EDP=2, 2 accumulated micro-batches, attach_step_state) in fp32 on the
spawn shared with the other EP tests; same checks, biases atol=1e-6.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups, is_expert_param
from megamoe.routing.balancing import AuxFreeBalancingConfig
from megamoe.stats import evaluate_max_vio
from megamoe.train.step_state import MoEStepState
from megamoe.testing import run_distributed
from test_balancing_dist import DIM, EXPERTS, MICRO, TOP_K, build, make_data, reference

pytestmark = pytest.mark.distributed

WORLD, STEPS, LR, EP_SIZES = 4, 4, 0.05, (2, 4)
CFG = AuxFreeBalancingConfig("sign", 0.01)


def _reduce_grads(model: nn.Module, groups, world: int) -> None:
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=groups.edp_group if is_expert_param(p) else None)
        p.grad.div_(world)


def ep_worker(rank: int, world: int, x, y, held) -> dict:
    results = {}
    for ep_size in EP_SIZES:
        model = build("softmax", torch.float64)
        bal = MoEStepState(model, balancing=CFG)
        groups = build_expert_parallel_groups(ep_size)
        apply_expert_parallel(model, groups)
        assert model.moe1.experts.num_experts == EXPERTS // ep_size
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        metrics = []
        for s in range(STEPS):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[s, rank]), y[s, rank]).backward()
            _reduce_grads(model, groups, world)
            opt.step()
            bal.end_step()
            metrics.append(bal.last_metrics)
        results[ep_size] = {"biases": {k: v.clone() for k, v in bal.balancer.biases().items()}, "metrics": metrics,
                            "num_updates": bal.balancer.num_updates,
                            "eval": evaluate_max_vio(model, [held[rank]])}
    return results


# Through the DeepSpeed engine (ZeRO-2, EP=2 x EDP=2 on the 4-process spawn shared with the other
# EP tests, see ep_runs.py): attach_step_state must update once per accumulated batch.
DS_EP, DS_ACCUM, DS_STEPS = 2, 2, 3
DS_CFG = AuxFreeBalancingConfig("sign", 0.01, "inv")


def deepspeed_ep_worker(rank: int, world: int) -> dict:
    from megamoe.integrations import deepspeed as mds

    x, y, held = make_data(DS_STEPS, world * DS_ACCUM)
    model = build("softmax", torch.float32)
    bal = MoEStepState(model, balancing=DS_CFG)
    groups = build_expert_parallel_groups(DS_EP)
    apply_expert_parallel(model, groups)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": DS_ACCUM,
              "train_batch_size": MICRO * DS_ACCUM * world, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine = mds.initialize(model, config, groups, step_state=bal,
                            optimizer=torch.optim.SGD(mds.moe_param_groups(model), lr=LR))
    mds.attach_step_state(engine, bal)
    metrics = []
    for s in range(DS_STEPS):
        for m in range(DS_ACCUM):
            part = rank * DS_ACCUM + m
            xs, ys = x[s, part].to(engine.device), y[s, part].to(engine.device)
            loss = nn.functional.cross_entropy(engine(xs), ys)
            engine.backward(loss)
            engine.step()
            if m < DS_ACCUM - 1:
                assert bal.balancer.num_updates == s
        metrics.append(bal.last_metrics)
    shard = held[rank * DS_ACCUM:(rank + 1) * DS_ACCUM].reshape(-1, DIM).to(engine.device)
    return {"biases": {k: v.clone() for k, v in bal.balancer.biases().items()}, "metrics": metrics,
            "eval": evaluate_max_vio(model, [shard]), "num_updates": bal.balancer.num_updates}


@pytest.mark.slow
def test_alflb_through_deepspeed_engine_under_ep_equals_single_process(ep_runs) -> None:
    from test_balancing_dist import check_against_reference

    x, y, held = make_data(DS_STEPS, WORLD * DS_ACCUM)
    ref = reference(x, y, held, "softmax", torch.float32, DS_CFG, LR)
    assert all(m["alflb/slots"] == WORLD * DS_ACCUM * MICRO * TOP_K for m in ref["metrics"])
    check_against_reference([r["alflb_ds"] for r in ep_runs(WORLD)], ref, DS_STEPS)


@pytest.fixture(scope="module")
def data():
    x, y, held = make_data(STEPS, WORLD)
    return x.double(), y, held.double()


@pytest.fixture(scope="module")
def ep_results(data):
    return run_distributed(ep_worker, WORLD, *data)


@pytest.mark.parametrize("ep_size", EP_SIZES)
def test_alflb_biases_under_ep_equal_single_process(ep_size, data, ep_results) -> None:
    x, y, held = data
    ref = reference(x, y, held, "softmax", torch.float64, CFG, LR)
    assert all(m["alflb/slots"] == WORLD * MICRO * TOP_K for m in ref["metrics"])
    results = [r[ep_size] for r in ep_results]
    for r in results:
        assert r["num_updates"] == STEPS
        for name, bias in ref["biases"].items():
            assert bias.abs().max() > 0
            torch.testing.assert_close(r["biases"][name], bias, rtol=0, atol=1e-6)
            assert torch.equal(r["biases"][name], results[0]["biases"][name])  # bitwise the same everywhere
        for got, want in zip(r["metrics"], ref["metrics"]):
            assert got["alflb/slots"] == want["alflb/slots"]
            assert got["alflb/max_vio_batch"] == pytest.approx(want["alflb/max_vio_batch"], abs=1e-12)
        assert r["eval"] == pytest.approx(ref["eval"], abs=1e-12)
