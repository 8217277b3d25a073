"""Checkpoints saved at EP=2 resume at other EP sizes, world sizes and ZeRO stages, optimizer
state included, and continue exactly as a run that never stopped.

World 2 (EP=2, ZeRO-2) trains 2 AdamW steps under a warmup LR schedule, saves, and trains 2
more: the uninterrupted run. Fresh engines (other initial weights) load the checkpoint and
take the same 2 steps:
- world 2, EP=2, ZeRO-2 (the saving layout: DeepSpeed's own files restore everything);
- world 2, EP=1, ZeRO-1; world 4, EP=4, ZeRO-2; world 4, EP=2 x EDP=2, ZeRO-0: experts are
  resharded and the Adam moments, step counts and the learning rate in effect are rebuilt
  from the layout-independent optimizer state (restarting the moments from zero, or the LR
  from the schedule's start, changes the continued steps by ~lr and fails the check).
Every run's loss curve and final parameters must equal a single-process AdamW run on the
same global batches that never stopped. The global batch is the same at every world size and
routing is dropless without an aux loss, so nothing depends on how the batch is split.
``load_full_state_dict`` must reproduce the saving run's consolidated weights, and
``load_full_optimizer_state`` the reference optimizer's moments at the save. In bf16 (ZeRO-0's
unfused optimizer and ZeRO-2), Adam state loaded at EP=1 and saved again must equal the
EP=2 state bit for bit.

Tolerance: fp32; losses rtol=1e-5, atol=1e-6; parameters and moments rtol=1e-4, atol=1e-6
(Adam divides by sqrt(v), so reduction-order differences of ~1e-7 in small gradients grow to
~1e-5 relative in a step; a lost moment or LR changes parameters by ~1e-3).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from tiny_model import build_model, global_batches, lm_loss

GLOBAL_BATCH, SEQ, SAVE_AT, STEPS = 8, 8, 2, 4
LR, WD, WARMUP = 3e-3, 0.01, 3
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
PARAM_TOL = dict(rtol=1e-4, atol=1e-6)
# (world, ep_size, zero stage) of the runs that resume the EP=2 ZeRO-2 checkpoint.
RESUMES = {2: ((2, 2), (1, 1)), 4: ((4, 2), (2, 0))}


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


def _engine(groups, stage: int, seed: int):
    from megamoe.integrations import deepspeed as mds

    world = groups.world_size
    model = apply_expert_parallel(build_model(seed=seed, aux=0.0), groups)
    opt = torch.optim.AdamW(mds.moe_param_groups(model, weight_decay=WD), lr=LR)
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 6}
    return mds.initialize(model, config, groups, optimizer=opt,
                          lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, warmup))


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


def _result(engine, groups, losses: list[float]) -> dict:
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "ep_rank": groups.ep_rank, "edp_rank": groups.edp_rank, "ep_size": groups.ep_size}


def _resume(ep_size: int, stage: int, ckpt: str) -> dict:
    from megamoe.checkpoint.reshardable import load_checkpoint

    groups = build_expert_parallel_groups(ep_size)
    engine = _engine(groups, stage, seed=99)
    client = load_checkpoint(engine, ckpt)
    assert client == {"data_step": SAVE_AT}
    assert engine.global_steps == SAVE_AT
    return _result(engine, groups, _train(engine, client["data_step"], STEPS))


def world2(rank: int, world: int, root: str) -> dict:
    from megamoe.checkpoint.reshardable import save_checkpoint

    ep2 = build_expert_parallel_groups(2)
    engine = _engine(ep2, 2, seed=0)
    curve = _train(engine, 0, SAVE_AT)
    path = save_checkpoint(engine, os.path.join(root, "adamw"), client_state={"data_step": SAVE_AT})
    out = {"ep_rank": ep2.ep_rank, "path": path,
           "saved_state": {k: v.clone() for k, v in engine.module.state_dict().items()}}
    out["uninterrupted"] = _result(engine, ep2, curve + _train(engine, SAVE_AT, STEPS))
    out["resumed"] = {run: _resume(*run, os.path.join(root, "adamw")) for run in RESUMES[2]}
    # ZeRO-3 (every parameter partitioned): same-layout save/resume, and the ZeRO-2 checkpoint
    # loaded into an EP=1 ZeRO-3 engine (weights into the partitions and fp32 master weights;
    # the optimizer state restarts there).
    engine = _engine(ep2, 3, seed=0)
    curve = _train(engine, 0, SAVE_AT)
    save_checkpoint(engine, os.path.join(root, "adamw_z3"), client_state={"data_step": SAVE_AT})
    out["z3_uninterrupted"] = curve + _train(engine, SAVE_AT, STEPS)
    out["z3_resumed"] = _resume(2, 3, os.path.join(root, "adamw_z3"))["losses"]
    out["z2_into_z3_ep1"] = _resume(1, 3, os.path.join(root, "adamw"))["losses"]
    bf16_round_trip(root)
    return out


def bf16_round_trip(root: str) -> None:
    """bf16 at ZeRO-0 (DeepSpeed's unfused optimizer, one fp32 copy per parameter) and ZeRO-2
    (flat partitions): save at EP=2 (tag "ep2"), load at EP=1 and save again at once (tag "ep1")."""
    from megamoe.integrations import deepspeed as mds
    from megamoe.checkpoint import reshardable

    for stage in (0, 2):
        path = os.path.join(root, f"bf16_zero{stage}")
        for ep_size in (2, 1):
            groups = build_expert_parallel_groups(ep_size)
            model = apply_expert_parallel(build_model(seed=ep_size, aux=0.0), groups)
            config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2,
                      "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
                      "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6}
            opt = torch.optim.AdamW(mds.moe_param_groups(model, weight_decay=WD), lr=LR)
            engine = mds.initialize(model, config, groups, optimizer=opt)
            if ep_size == 2:
                _train(engine, 0, SAVE_AT)
            else:
                reshardable.load_checkpoint(engine, path, tag="ep2")
            reshardable.save_checkpoint(engine, path, tag=f"ep{ep_size}")


def world4(rank: int, world: int, root: str) -> dict:
    return {run: _resume(*run, os.path.join(root, "adamw")) for run in RESUMES[4]}


def reference() -> dict:
    """Single process, all experts local, STEPS AdamW steps on the global batches."""
    from megamoe.integrations.deepspeed import moe_param_groups

    model = build_model(seed=0, aux=0.0)
    opt = torch.optim.AdamW(moe_param_groups(model, weight_decay=WD), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    names = {id(p): n for n, p in model.named_parameters()}
    data = global_batches(STEPS, batch=GLOBAL_BATCH, seq=SEQ)
    losses, moments = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = lm_loss(model, data[step])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step + 1 == SAVE_AT:
            moments = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return {"losses": losses, "state": model.state_dict(), "moments_at_save": moments}


def reference_fresh_optimizer_after_save() -> list[float]:
    """The single-process losses after SAVE_AT when AdamW restarts there (fresh moments and step
    count, the LR schedule continuing): what a ZeRO-3 engine at another layout must give."""
    from megamoe.integrations.deepspeed import moe_param_groups

    model = build_model(seed=0, aux=0.0)
    data = global_batches(STEPS, batch=GLOBAL_BATCH, seq=SEQ)
    losses = []
    opt = None
    for step in range(STEPS):
        if step in (0, SAVE_AT):
            opt = torch.optim.AdamW(moe_param_groups(model, weight_decay=WD), lr=LR)
        for group in opt.param_groups:
            group["lr"] = LR * warmup(step)
        opt.zero_grad()
        loss = lm_loss(model, data[step])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses[SAVE_AT:]


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_resumes_at_other_layouts_with_optimizer_state(ep_runs) -> None:
    from megamoe.checkpoint.reshardable import load_full_optimizer_state, load_full_state_dict
    from test_ep_deepspeed import consolidate

    root = ep_runs.root
    saved = [r["ckpt"] for r in ep_runs(2)]
    assert os.path.isdir(saved[0]["path"]) and not any(n.startswith(".") for n in os.listdir(os.path.join(root, "adamw")))
    full = load_full_state_dict(os.path.join(root, "adamw"))
    by_ep = {r["ep_rank"]: r["saved_state"] for r in saved}
    for key, value in full.items():
        expected = torch.cat([by_ep[0][key], by_ep[1][key]]) if ".experts." in key else by_ep[0][key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    assert full["blocks.0.moe.experts.gate_up_proj"].shape[0] == 4

    ref = reference()
    optim = load_full_optimizer_state(os.path.join(root, "adamw"))
    assert optim["params"].keys() == ref["moments_at_save"].keys()
    for name, want in ref["moments_at_save"].items():
        got = optim["params"][name]
        assert float(got["other"]["step"]) == SAVE_AT
        for key in ("exp_avg", "exp_avg_sq"):
            assert want[key].abs().max() > 0
            torch.testing.assert_close(got["tensors"][key], want[key], **PARAM_TOL, msg=lambda m: f"{name} {key}: {m}")
    assert {g["hyper"]["lr"] for g in optim["groups"]} == {LR * warmup(SAVE_AT)}

    runs = {("uninterrupted", 2, 2): [r["uninterrupted"] for r in saved]}
    runs.update({("resumed", *run): [r["resumed"][run] for r in saved] for run in RESUMES[2]})
    world4 = [r["ckpt"] for r in ep_runs(4)]
    runs.update({("resumed", *run): [r[run] for r in world4] for run in RESUMES[4]})
    for label, per_rank in runs.items():
        want_losses = ref["losses"] if label[0] == "uninterrupted" else ref["losses"][SAVE_AT:]
        for r in per_rank:
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(want_losses), **LOSS_TOL,
                                       msg=lambda m: f"{label} losses: {m}")
        got = consolidate(per_rank)
        assert got.keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            torch.testing.assert_close(got[key], value, **PARAM_TOL, msg=lambda m: f"{label} {key}: {m}")

    # ZeRO-3: trains the reference curve, resumes exactly at its own layout, and a ZeRO-2
    # checkpoint loaded into an EP=1 ZeRO-3 engine continues with restarted Adam state.
    fresh = torch.tensor(reference_fresh_optimizer_after_save())
    assert (fresh - torch.tensor(ref["losses"][SAVE_AT:])).abs().max() > 1e-5  # the restart is visible
    for r in saved:
        torch.testing.assert_close(torch.tensor(r["z3_uninterrupted"]), torch.tensor(ref["losses"]), **LOSS_TOL)
        torch.testing.assert_close(torch.tensor(r["z3_resumed"]), torch.tensor(ref["losses"][SAVE_AT:]), **LOSS_TOL)
        torch.testing.assert_close(torch.tensor(r["z2_into_z3_ep1"]), fresh, **LOSS_TOL)


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_optimizer_state_survives_a_layout_change(ep_runs) -> None:
    from megamoe.checkpoint.reshardable import load_full_optimizer_state

    ep_runs(2)
    for stage in (0, 2):
        path = os.path.join(ep_runs.root, f"bf16_zero{stage}")
        saved, again = (load_full_optimizer_state(path, tag) for tag in ("ep2", "ep1"))
        assert saved["params"].keys() == again["params"].keys() and len(saved["params"]) > 0
        for name, entry in saved["params"].items():
            assert entry["tensors"].keys() == {"exp_avg", "exp_avg_sq"}, name
            # DeepSpeed's unfused optimizer takes one zero-gradient step at construction.
            assert float(entry["other"]["step"]) == SAVE_AT + (stage == 0)
            assert float(again["params"][name]["other"]["step"]) == float(entry["other"]["step"])
            for key, value in entry["tensors"].items():
                assert value.abs().max() > 0
                torch.testing.assert_close(again["params"][name]["tensors"][key], value, rtol=0, atol=0)
        assert [g["hyper"]["lr"] for g in again["groups"]] == [g["hyper"]["lr"] for g in saved["groups"]]
