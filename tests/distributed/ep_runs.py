"""One process spawn per world size for all expert-parallel distributed tests (EP layer, ZeRO-0..3, fp16, checkpoints).

Starting a process that imports torch and DeepSpeed costs far more on a 2-core CI machine
than the tiny jobs themselves, so the EP tests share two spawns: world 2 runs the EP=2
layer cases, a ZeRO-2 step with starved experts and ranks, and saves/resumes the EP=2
checkpoints; world 4 (started after world 2, as it
resumes those checkpoints at EP=4) runs the EP=4 and EP=2 x EDP=2 layer cases, the
DeepSpeed ZeRO training runs, ALF-LB through the DeepSpeed engine and the EP=4 and EP=2 x EDP=2
resumes. Each test module asserts on its part of
the results against its own single-process reference.

Tests use it through the session fixture ``ep_runs`` (tests/distributed/conftest.py), which
returns ``get(world) -> list of per-rank result dicts``, spawning lazily once per world.
"""
from __future__ import annotations

from megamoe.testing import run_distributed

ZERO_RUNS = ((2, 2, "fp32"), (2, 1, "fp32"), (2, 0, "fp32"), (2, 3, "fp32"), (2, 2, "bf16"), (2, 3, "bf16"))
ZERO3_EP1_RUNS = ((1, 3, "fp32"),)  # world 2


def world_worker(rank: int, world: int, root: str) -> dict:
    import test_ep_checkpoint as ckpt
    import test_ep_deepspeed as zero
    import test_ep_fp16 as fp16
    import test_ep_layer as layer

    if world == 2:
        return {"layer": layer.worker(rank, world, (2,)), "all_remote": zero.all_remote_step(rank, world),
                "zero": {run: zero.train_ds(rank, world, *run) for run in ZERO3_EP1_RUNS},
                "fp16": fp16.train_fp16(rank, world),
                "ckpt": ckpt.world2(rank, world, root)}
    import test_alflb_ep as alflb

    return {"layer": layer.worker(rank, world, (4, 2)), "alflb_ds": alflb.deepspeed_ep_worker(rank, world),
            "zero": {run: zero.train_ds(rank, world, *run) for run in ZERO_RUNS},
            "ckpt": ckpt.world4(rank, world, root)}


def run_worlds(root: str):
    """``get(world)``: every rank's results for that world size, spawning at most once."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world == 4:
            get(2)  # the EP=4 resume reads the checkpoints world 2 wrote
        if world not in cache:
            cache[world] = run_distributed(world_worker, world, root)
        return cache[world]

    get.root = root  # type: ignore[attr-defined]
    return get


