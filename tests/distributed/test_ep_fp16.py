"""fp16 with dynamic loss scaling under DeepSpeed ZeRO-1/2/3 with EP=2 == single-process training.

2 real gloo processes (EP=2) train the tiny MoE transformer for 4 SGD steps with gradient
accumulation (2 micro-batches), active global-norm clipping and a large aux-loss coefficient
(0.3, so a wrongly scaled aux-loss gradient moves the router visibly). Step 1 overflows on
purpose (rank 0 back-propagates an infinite loss on its first micro-batch): DeepSpeed must
skip that step and halve the loss scale (hysteresis 1), and the next steps must feed the
aux loss the new scale. The reference trains the fp32 model in this process on the same
global batch and skips step 1, which is what dynamic loss scaling means for the weights.

Why SGD: AdamW is nearly invariant to the gradient scale, SGD is not, so a loss-scale
error in the aux gradient shows in the weights as well as in the gradient norm.

DeepSpeed's CPU accelerator reports fp16 unsupported on CPUs without AVX512-FP16/AMX-FP16
(``torch.ops.mkldnn._is_mkldnn_fp16_supported()``), and then refuses ``fp16.enabled``.
Where that is the case (the CI machine), the worker lifts that one capability check for the
fp16 runs; the loss scaler, overflow check, skip and ZeRO fp16 optimizers are DeepSpeed's
own code, and torch computes the fp16 model with its CPU half kernels.

Tolerance (fp16 weights, fp32 master weights and reference): every non-skipped step's global
pre-clip gradient norm rtol=2e-3 (the correct runs agree to ~1e-4; an aux gradient not
multiplied by the loss scale is 1.6% off); losses atol=1e-3; parameters rtol=1e-3 (about one
fp16 ulp) + atol=2e-4.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups
from megamoe.train.step_state import MoEStepState
from tiny_model import build_model, global_batches, lm_loss

STEPS, GAS, MICRO, SEQ = 4, 2, 2, 8
LR, CLIP, AUX, OVERFLOW_STEP, INITIAL_SCALE_POWER = 0.1, 0.5, 0.3, 1, 10
FP16_STAGES = (1, 2, 3)
TOL = {"norm": dict(rtol=2e-3, atol=0), "loss": dict(rtol=0, atol=1e-3), "param": dict(rtol=1e-3, atol=2e-4)}


def fp16_config(stage: int, world: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": INITIAL_SCALE_POWER,
                     "hysteresis": 1, "loss_scale_window": 1000, "min_loss_scale": 1},
            "train_batch_size": MICRO * GAS * world, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6}


def micro_batch(data: torch.Tensor, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    start = (micro * world + rank) * MICRO
    return data[step, start:start + MICRO]


def _train(rank: int, world: int, stage: int) -> dict:
    from megamoe.integrations import deepspeed as mds
    from megamoe.checkpoint import reshardable

    groups = build_expert_parallel_groups(2)
    model = apply_expert_parallel(build_model(aux=AUX), groups)
    engine = mds.initialize(model, fp16_config(stage, world), groups,
                            optimizer=torch.optim.SGD(mds.moe_param_groups(model), lr=LR))
    data = global_batches(STEPS, batch=MICRO * GAS * world, seq=SEQ)
    losses, norms, scales = [], [], []
    for step in range(STEPS):
        scales.append(mds.current_loss_scale(engine))
        total = torch.zeros(())
        for micro in range(GAS):
            loss = lm_loss(engine, micro_batch(data, step, micro, rank, world))
            overflow = step == OVERFLOW_STEP and micro == 0 and rank == 0
            engine.backward(loss * math.inf if overflow else loss)
            engine.step()
            total += loss.detach().float().cpu() / GAS
        dist.all_reduce(total)
        losses.append(float(total) / world)
        norms.append(float(engine.get_global_grad_norm()))
    return {"losses": losses, "grad_norms": norms, "scales": scales, "skipped": engine.skipped_steps,
            "global_steps": engine.global_steps,
            "state": {k: v.float() for k, v in reshardable.module_state_dict(engine).items()},
            "ep_rank": groups.ep_rank, "edp_rank": groups.edp_rank, "ep_size": groups.ep_size}


def train_fp16(rank: int, world: int) -> dict:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    lifted = not accelerator.is_fp16_supported()
    if lifted:  # see the module docstring
        accelerator.is_fp16_supported = lambda: True
    try:
        return {stage: _train(rank, world, stage) for stage in FP16_STAGES}
    finally:
        if lifted:
            del accelerator.is_fp16_supported


def train_reference(world: int) -> dict:
    model = build_model(aux=AUX)
    MoEStepState(model, accumulation_steps=world * GAS)  # the aux loss weighs like one of world*GAS micro-batches
    opt = torch.optim.SGD(model.parameters(), lr=LR)
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
        losses.append(total)
        if step == OVERFLOW_STEP:  # skipped: no update, gradients discarded
            norms.append(math.nan)
            continue
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return {"losses": losses, "grad_norms": norms, "state": model.state_dict()}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", FP16_STAGES)
def test_fp16_dynamic_loss_scaling_matches_single_process(ep_runs, stage: int) -> None:
    from test_ep_deepspeed import consolidate

    world = 2
    per_rank = [r["fp16"][stage] for r in ep_runs(world)]
    ref = train_reference(world)
    assert min(n for n in ref["grad_norms"] if not math.isnan(n)) > CLIP  # clipping is active
    kept = [s for s in range(STEPS) if s != OVERFLOW_STEP]
    initial = 2.0 ** INITIAL_SCALE_POWER
    for r in per_rank:
        # The skipped step still counts once as a step (ALF-LB's DeepSpeed hook updates on
        # global_steps, so the overflow step's routed tokens are neither lost nor counted twice).
        assert r["skipped"] == 1 and r["global_steps"] == STEPS
        # The scale seen by each step's forward: halved by the overflow, not before.
        assert r["scales"] == [initial] * (OVERFLOW_STEP + 1) + [initial / 2] * (STEPS - OVERFLOW_STEP - 1)
        torch.testing.assert_close(torch.tensor([r["grad_norms"][s] for s in kept]),
                                   torch.tensor([ref["grad_norms"][s] for s in kept]), **TOL["norm"])
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), **TOL["loss"])
    got = consolidate(per_rank)
    assert got.keys() == ref["state"].keys()
    for key, value in ref["state"].items():
        torch.testing.assert_close(got[key], value, **TOL["param"], msg=lambda m: f"ZeRO-{stage} {key}: {m}")
