"""Checkpoints saved at EP=2 resume at EP=2, EP=1 and EP=4 and continue the same loss curve.

World 2 (EP=2, ZeRO-2) trains 2 steps, saves, and trains 2 more: the uninterrupted
curve. A fresh engine (different initial weights) loading the checkpoint must continue
that curve:
- at the same layout with AdamW: weights and optimizer state are restored, so the
  continuation is exact;
- at EP=1 (world 2) and EP=4 (world 4) with plain SGD: the experts are resharded. Plain
  SGD has no optimizer state, which is the only state a layout change does not carry
  over (documented in megamoe.integrations.deepspeed), so the curve must match too.
The global batch is the same at every world size and routing is dropless without an
aux loss, so the loss curve does not depend on how the batch is split over ranks.
``load_full_state_dict`` must reproduce the saving run's consolidated weights.
ZeRO-3 (every parameter partitioned): an EP=2 ZeRO-3 run saves and resumes at the same
layout exactly (AdamW), and the ZeRO-2 SGD checkpoint resumes into an EP=1 ZeRO-3 engine
(weights copied into the partitions and master weights).

Tolerance: fp32, rtol=1e-5, atol=1e-6 on the losses and weights.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from tiny_model import build_model, global_batches, lm_loss

GLOBAL_BATCH, SEQ, SAVE_AT, STEPS = 8, 8, 2, 4
RUNS = {"adamw": 2, "sgd": 2, "adamw_z3": 3}  # checkpoint name -> ZeRO stage of the saving run
TOL = dict(rtol=1e-5, atol=1e-6)


def _engine(groups, optimizer: str, seed: int, stage: int = 2):
    from megamoe.integrations import deepspeed as mds

    world = groups.world_size
    model = apply_expert_parallel(build_model(seed=seed, aux=0.0), groups)
    params = mds.moe_param_groups(model, weight_decay=0.01)
    opt = (torch.optim.AdamW(params, lr=3e-3) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.1))
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 6}
    return mds.initialize(model, config, groups, optimizer=opt)


def _train(engine, start: int, stop: int) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = global_batches(STEPS, batch=GLOBAL_BATCH, seq=SEQ)
    micro = GLOBAL_BATCH // world
    losses = []
    for step in range(start, stop):
        loss = lm_loss(engine, data[step, rank * micro:(rank + 1) * micro])
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _resume(groups, optimizer: str, ckpt: str, stage: int = 2) -> list[float]:
    from megamoe.integrations.deepspeed import load_checkpoint

    engine = _engine(groups, optimizer, seed=99, stage=stage)
    client = load_checkpoint(engine, ckpt)
    assert client == {"data_step": SAVE_AT}
    assert engine.global_steps == SAVE_AT
    return _train(engine, client["data_step"], STEPS)


def world2(rank: int, world: int, root: str) -> dict:
    from megamoe.integrations.deepspeed import module_state_dict, save_checkpoint

    ep2 = build_expert_parallel_groups(2)
    out = {"ep_rank": ep2.ep_rank}
    for name, stage in RUNS.items():
        optimizer = name.split("_")[0]
        engine = _engine(ep2, optimizer, seed=0, stage=stage)
        curve = _train(engine, 0, SAVE_AT)
        path = save_checkpoint(engine, os.path.join(root, name), client_state={"data_step": SAVE_AT})
        out[f"{name}_saved_state"] = {k: v.clone() for k, v in module_state_dict(engine).items()}
        out[f"{name}_path"] = path
        out[f"{name}_curve"] = curve + _train(engine, SAVE_AT, STEPS)
    out["adamw_resumed_ep2"] = _resume(ep2, "adamw", os.path.join(root, "adamw"))
    out["adamw_z3_resumed_ep2"] = _resume(ep2, "adamw", os.path.join(root, "adamw_z3"), stage=3)
    ep1 = build_expert_parallel_groups(1)
    out["sgd_resumed_ep1"] = _resume(ep1, "sgd", os.path.join(root, "sgd"))
    out["sgd_resumed_ep1_z3"] = _resume(ep1, "sgd", os.path.join(root, "sgd"), stage=3)
    return out


def world4(rank: int, world: int, root: str) -> list[float]:
    return _resume(build_expert_parallel_groups(4), "sgd", os.path.join(root, "sgd"))


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_resumes_at_other_ep_sizes(ep_runs) -> None:
    from megamoe.integrations.deepspeed import load_full_state_dict

    root = ep_runs.root
    saved = [r["ckpt"] for r in ep_runs(2)]
    first = saved[0]
    assert os.path.isdir(first["sgd_path"]) and not any(n.startswith(".") for n in os.listdir(os.path.join(root, "sgd")))
    for optimizer in RUNS:
        full = load_full_state_dict(os.path.join(root, optimizer))
        by_ep = {r["ep_rank"]: r[f"{optimizer}_saved_state"] for r in saved}
        for key, value in full.items():
            expected = torch.cat([by_ep[0][key], by_ep[1][key]]) if ".experts." in key else by_ep[0][key]
            torch.testing.assert_close(value, expected, rtol=0, atol=0)
        assert full["blocks.0.moe.experts.gate_up_proj"].shape[0] == 4
    tail = slice(SAVE_AT, STEPS)
    adamw, sgd = torch.tensor(first["adamw_curve"][tail]), torch.tensor(first["sgd_curve"][tail])
    adamw_z3 = torch.tensor(first["adamw_z3_curve"][tail])
    # ZeRO-3 trains the same curve as ZeRO-2 (up to reduction order).
    torch.testing.assert_close(torch.tensor(first["adamw_z3_curve"]), torch.tensor(first["adamw_curve"]), **TOL)
    for r in saved:
        torch.testing.assert_close(torch.tensor(r["adamw_resumed_ep2"]), adamw, **TOL)
        torch.testing.assert_close(torch.tensor(r["adamw_z3_resumed_ep2"]), adamw_z3, **TOL)
        torch.testing.assert_close(torch.tensor(r["sgd_resumed_ep1"]), sgd, **TOL)
        torch.testing.assert_close(torch.tensor(r["sgd_resumed_ep1_z3"]), sgd, **TOL)
    for losses in (r["ckpt"] for r in ep_runs(4)):
        torch.testing.assert_close(torch.tensor(losses), sgd, **TOL)
