"""ALF-LB on real processes: the biases after data-parallel steps (DDP, DeepSpeed) with gradient
accumulation equal those one process computes on the concatenated batches, and are identical
on every rank.

Each step's global batch is split into world_size x accumulation micro-batches; rank r takes
micro-batches r*A .. r*A+A-1. The model is token-wise (no attention), so one forward over the
concatenated batch is exactly the union of the micro-batches. Expert-parallel variants follow
once the all-to-all dispatcher lands (they only change where experts run: counting happens in
the routers, before dispatch).
"""
import contextlib

import pytest
import torch
from torch import nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.routing.balancing import AuxFreeBalancingConfig
from megamoe.stats import evaluate_max_vio
from megamoe.train.step_state import MoEStepState
from megamoe.testing import run_distributed

pytestmark = pytest.mark.distributed

DIM, EXPERTS, TOP_K, MICRO = 8, 4, 2, 6


class Net(nn.Module):
    def __init__(self, score_func: str):
        super().__init__()
        cfg = MoEConfig(hidden_size=DIM, num_experts=EXPERTS, experts=ExpertConfig(intermediate_size=16),
                        router=RouterConfig(top_k=TOP_K, aux_loss_coef=0.0, options={"score_func": score_func}))
        self.inp = nn.Linear(DIM, DIM)
        self.moe1 = MoELayer(cfg, layer_index=0)
        self.moe2 = MoELayer(cfg, layer_index=1)
        self.out = nn.Linear(DIM, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        return self.out(h + self.moe2(h))


def make_data(steps: int, parts: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, parts, MICRO, DIM, generator=g)
    # A skewed input direction makes the untrained router unbalanced, so the biases move a lot.
    x[..., 0] += 1.5
    y = torch.randint(3, (steps, parts, MICRO), generator=g)
    held = torch.randn(parts, 10, DIM, generator=g)
    return x, y, held


def build(score_func: str, dtype: torch.dtype) -> Net:
    torch.manual_seed(0)
    return Net(score_func).to(dtype)


def reference(x, y, held, score_func, dtype, cfg, lr):
    model = build(score_func, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    bal = MoEStepState(model, balancing=cfg)
    bal.attach_to_optimizer(opt)
    metrics = []
    for s in range(x.shape[0]):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[s].reshape(-1, DIM).to(dtype)), y[s].reshape(-1))
        loss.backward()
        opt.step()
        metrics.append(bal.last_metrics)
    return {"biases": {k: v.clone() for k, v in bal.balancer.biases().items()}, "metrics": metrics,
            "eval": evaluate_max_vio(model, [held.reshape(-1, DIM).to(dtype)])}


def ddp_worker(rank, world, x, y, held, score_func, dtype, cfg, lr, accum):
    model = build(score_func, dtype)
    # A stale local bias (say, a rank that loaded another checkpoint) is replaced by rank 0's
    # when the balancer is built, before DDP would broadcast buffers on its own.
    model.moe1.router.enable_selection_bias().fill_(float(rank))
    bal = MoEStepState(model, balancing=cfg)
    initial = [b.clone() for b in bal.balancer.biases().values()]
    # Experts that get no token in a micro-batch take no part in its graph.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    bal.attach_to_optimizer(opt)
    metrics = []
    for s in range(x.shape[0]):
        opt.zero_grad()
        for m in range(accum):
            part = rank * accum + m
            sync = contextlib.nullcontext() if m == accum - 1 else ddp.no_sync()
            with sync:
                loss = nn.functional.cross_entropy(ddp(x[s, part].to(dtype)), y[s, part]) / accum
                loss.backward()
        opt.step()
        metrics.append(bal.last_metrics)
    shard = held[rank * accum:(rank + 1) * accum].reshape(-1, DIM).to(dtype)
    return {"biases": {k: v.clone() for k, v in bal.balancer.biases().items()}, "metrics": metrics,
            "eval": evaluate_max_vio(model, [shard]), "num_updates": bal.balancer.num_updates, "initial": initial}


def check_against_reference(results, ref, steps):
    for r in results:
        assert r["num_updates"] == steps
        for name, bias in ref["biases"].items():
            torch.testing.assert_close(r["biases"][name], bias, rtol=0, atol=1e-6)
            assert torch.equal(r["biases"][name], results[0]["biases"][name])  # bitwise the same everywhere
            assert bias.abs().max() > 0
        for got, want in zip(r["metrics"], ref["metrics"]):
            assert got["alflb/slots"] == want["alflb/slots"]
            assert got["alflb/max_vio_batch"] == pytest.approx(want["alflb/max_vio_batch"], abs=1e-12)
        assert r["eval"] == pytest.approx(ref["eval"], abs=1e-12)


@pytest.mark.parametrize("world, accum, score_func, cfg", [
    (2, 2, "softmax", AuxFreeBalancingConfig("sign", 0.01)),
    (4, 1, "sigmoid", AuxFreeBalancingConfig("linear", 0.05, "inv_sqrt", center=True)),
])
def test_ddp_biases_equal_single_process_on_concatenated_batch(world, accum, score_func, cfg):
    steps, lr, dtype = 4, 0.05, torch.float64
    x, y, held = make_data(steps, world * accum)
    results = run_distributed(ddp_worker, world, x, y, held, score_func, dtype, cfg, lr, accum)
    ref = reference(x, y, held, score_func, dtype, cfg, lr)
    assert all(m["alflb/slots"] == world * accum * MICRO * TOP_K for m in ref["metrics"])
    check_against_reference(results, ref, steps)
    assert all(torch.equal(b, torch.zeros(EXPERTS, dtype=torch.float32)) for r in results for b in r["initial"])


def deepspeed_worker(rank, world, x, y, held, cfg, lr, accum):
    import deepspeed

    from megamoe.integrations.deepspeed import attach_step_state

    model = build("softmax", torch.float32)
    bal = MoEStepState(model, balancing=cfg)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
                 "train_batch_size": MICRO * accum * world, "zero_optimization": {"stage": 0},
                 "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                      config=ds_config)
    attach_step_state(engine, bal)
    metrics = []
    for s in range(x.shape[0]):
        for m in range(accum):
            part = rank * accum + m
            xs, ys = x[s, part].to(engine.device), y[s, part].to(engine.device)
            loss = nn.functional.cross_entropy(engine(xs), ys)
            engine.backward(loss)  # the engine divides by the accumulation steps
            engine.step()          # a real optimizer step only at the boundary
            if m < accum - 1:
                assert bal.balancer.num_updates == s
        metrics.append(bal.last_metrics)
    shard = held[rank * accum:(rank + 1) * accum].reshape(-1, DIM).to(engine.device)
    return {"biases": {k: v.clone() for k, v in bal.balancer.biases().items()}, "metrics": metrics,
            "eval": evaluate_max_vio(model, [shard]), "num_updates": bal.balancer.num_updates}


@pytest.mark.slow
def test_deepspeed_engine_hook_respects_accumulation_boundaries():
    pytest.importorskip("deepspeed")
    world, accum, steps, lr = 2, 2, 3, 0.05
    cfg = AuxFreeBalancingConfig("sign", 0.01, "inv")
    x, y, held = make_data(steps, world * accum)
    results = run_distributed(deepspeed_worker, world, x, y, held, cfg, lr, accum)
    ref = reference(x, y, held, "softmax", torch.float32, cfg, lr)
    check_against_reference(results, ref, steps)
