"""DeepSpeed ZeRO training with expert parallelism == single-process training.

4 real gloo processes run EP=2 x DP=2 under ZeRO-1, ZeRO-2 and ZeRO-3 (and ZeRO-0) for a few
AdamW steps of a tiny MoE transformer with weight decay, gradient accumulation (2
micro-batches) and active global-norm gradient clipping. The reference trains the full
model in this process on the same global batch, split into the same per-rank
micro-batches (routing and aux losses are per micro-batch and rank in both runs).
2 processes run ZeRO-3 without expert parallelism (EP=1, experts partitioned over both
ranks). The ZeRO-3 runs set the persistence thresholds to 0, so every parameter is really
partitioned (experts over the expert-data-parallel group, checked in the workers).

Tolerance: fp32 runs: rtol=1e-4, atol=2e-5 on every parameter after the last step, on
every step's global mean loss and on every step's pre-clip global gradient norm.
bf16 runs (ZeRO-2 and ZeRO-3, bf16 weights and activations, fp32 master weights) against the same fp32
reference: losses atol=2e-2, gradient norms rtol=3e-2, parameters rtol=1.6e-2 (two bf16
ulps) + atol=2e-2 (AdamW turns bf16 noise in near-zero gradients into steps of up to lr
each, 3 steps x 3e-3 ~ 1e-2; the loss and gradient-norm checks are the sharp ones here).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from megamoe.train.step_state import MoEStepState
from ep_runs import ZERO3_EP1_RUNS, ZERO_RUNS
from tiny_model import build_model, global_batches, lm_loss

STEPS, GAS, MICRO, SEQ = 3, 2, 2, 8
LR, WD, CLIP = 3e-3, 0.01, 0.05
TOL = dict(rtol=1e-4, atol=2e-5)
BF16_TOL = {"loss": dict(rtol=0, atol=2e-2), "norm": dict(rtol=3e-2, atol=0), "param": dict(rtol=1.6e-2, atol=2e-2)}


def ds_config(stage: int, world: int, dtype: str = "fp32") -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter (by default ZeRO-3 keeps parameters this small whole).
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    return {"bf16": {"enabled": dtype == "bf16"},"train_batch_size": MICRO * GAS * world, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 6, "wall_clock_breakdown": False}


def micro_batch(data: torch.Tensor, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    start = (micro * world + rank) * MICRO
    return data[step, start:start + MICRO]


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8)


def train_ds(rank: int, world: int, ep_size: int, stage: int, dtype: str) -> dict:
    from megamoe.integrations import deepspeed as mds
    from megamoe.checkpoint import reshardable

    groups = build_expert_parallel_groups(ep_size)
    model = apply_expert_parallel(build_model(), groups)
    engine = mds.initialize(model, ds_config(stage, world, dtype), groups,
                            optimizer=make_optimizer(mds.moe_param_groups(model, weight_decay=WD)))
    data = global_batches(STEPS, batch=MICRO * GAS * world, seq=SEQ)
    losses, norms = [], []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(GAS):
            loss = lm_loss(engine, micro_batch(data, step, micro, rank, world))
            engine.backward(loss)
            engine.step()
            total += loss.detach().float().cpu() / GAS
        dist.all_reduce(total)
        losses.append(float(total) / world)
        norms.append(float(engine.get_global_grad_norm()))
    if stage == 3:
        # Really partitioned: experts over the EDP group, dense parameters over all ranks.
        for name, p in model.named_parameters():
            expected = groups.edp_group if ".experts." in name else dist.group.WORLD
            assert p.ds_tensor.numel() < p.ds_numel and dist.get_world_size(p.ds_process_group) == \
                dist.get_world_size(expected), name
    return {"losses": losses, "grad_norms": norms,
            "state": {k: v.float() for k, v in reshardable.module_state_dict(engine).items()},
            "ep_rank": groups.ep_rank, "edp_rank": groups.edp_rank, "ep_size": ep_size}


def train_reference(world: int) -> dict:
    from megamoe.integrations.deepspeed import moe_param_groups

    model = build_model()
    MoEStepState(model, accumulation_steps=world * GAS)  # the aux loss weighs like one of world*GAS micro-batches
    opt = make_optimizer(moe_param_groups(model, weight_decay=WD))
    data = global_batches(STEPS, batch=MICRO * GAS * world, seq=SEQ)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for micro in range(GAS):
            for rank in range(world):
                loss = lm_loss(model, micro_batch(data, step, micro, rank, world))
                (loss / (world * GAS)).backward()
                total += float(loss.detach()) / (world * GAS)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(total)
    return {"losses": losses, "state": model.state_dict(), "grad_norms": norms}


def consolidate(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full state dict from the ranks' shards: dense from rank 0, experts from EDP rank 0s."""
    state = dict(results[0]["state"])
    ep_size = results[0]["ep_size"]
    for key in state:
        if ".experts." in key:
            shards = {r["ep_rank"]: r["state"][key] for r in results if r["edp_rank"] == 0}
            state[key] = torch.cat([shards[i] for i in range(ep_size)])
    return state


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [4, 2])
def test_zero_stages_match_single_process(ep_runs, world: int) -> None:
    """World 4: EP=2 x DP=2 under ZeRO-0/1/2/3 (and bf16); world 2: ZeRO-3 without EP (EP=1)."""
    runs = ZERO_RUNS if world == 4 else ZERO3_EP1_RUNS
    results = [r["zero"] for r in ep_runs(world)]
    ref = train_reference(world)
    # Clipping must be active, or the global-norm path would go untested.
    assert min(ref["grad_norms"]) > 2 * CLIP
    for run in runs:
        per_rank = [r[run] for r in results]
        tol = BF16_TOL if run[2] == "bf16" else {"loss": TOL, "norm": TOL, "param": TOL}
        for r in per_rank:
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), **tol["loss"])
            # The pre-clip global norm counts dense params once and every expert once
            # (AdamW is nearly scale-invariant, so the parameters alone would not show a
            # wrong norm or a wrong expert-gradient scale).
            torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(ref["grad_norms"]), **tol["norm"])
        got = consolidate(per_rank)
        assert got.keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            torch.testing.assert_close(got[key], value, **tol["param"], msg=lambda m: f"{run} {key}: {m}")
        # Every EDP replica of an expert must hold the same values.
        for r in per_rank:
            for key, value in r["state"].items():
                twin = next(o for o in per_rank if o["ep_rank"] == r["ep_rank"])
                torch.testing.assert_close(value, twin["state"][key], rtol=0, atol=0)


def all_remote_step(rank: int, world: int) -> dict:
    """One ZeRO-2 SGD step of a lone MoE layer whose routing starves most experts and ranks."""
    from megamoe.integrations import deepspeed as mds
    from test_ep_layer import make_case

    layer, x, g = make_case("all_remote", world)
    groups = build_expert_parallel_groups(world)
    model = apply_expert_parallel(torch.nn.Sequential(layer), groups)
    config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6}
    engine = mds.initialize(model, config, groups, optimizer=torch.optim.SGD(mds.moe_param_groups(model), lr=0.1))
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    out = engine(x[rows].to(engine.device))
    engine.backward((out * g[rows].to(engine.device)).sum())
    engine.step()
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "ep_rank": groups.ep_rank, "edp_rank": groups.edp_rank, "ep_size": groups.ep_size}


@pytest.mark.distributed
def test_all_remote_routing_completes_a_zero2_step(ep_runs) -> None:
    from test_ep_layer import make_case

    world = 2
    results = [r["all_remote"] for r in ep_runs(world)]
    layer, x, g = make_case("all_remote", world)
    model = torch.nn.Sequential(layer)
    MoEStepState(model, accumulation_steps=world)  # DeepSpeed averages every gradient over the ranks
    for chunk_x, chunk_g in zip(x.chunk(world), g.chunk(world)):
        ((model(chunk_x) * chunk_g).sum() / world).backward()
    # DeepSpeed's default gradient_clipping is 1.0 (global norm).
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) > 1.0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    got = consolidate(results)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, **TOL, msg=lambda m: f"{key}: {m}")


def test_unknown_zero_stage_is_refused_with_supported_stages() -> None:
    from megamoe.integrations.deepspeed import validate_ds_config

    validate_ds_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="zero_optimization.stage=4 .* supported stages are 0, 1, 2, 3"):
        validate_ds_config({"zero_optimization": {"stage": 4}})
