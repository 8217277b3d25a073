"""A few EP x DP DeepSpeed steps of a tiny MoE transformer: the launcher smoke test entry.

Run through a launcher, e.g.
    launch/torchrun.sh --local-cpu --script tools/smoke/ep_smoke_train.py configs/ep_smoke.yaml steps=3
Every rank prints one ``EP_SMOKE_RESULT {json}`` line: world size, EP size and the global
mean loss of each step (the same batch every step, so a working run's loss falls).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))

from megamoe.integrations import deepspeed as mds  # noqa: E402
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups  # noqa: E402
from tiny_model import build_model, global_batches, lm_loss  # noqa: E402


def load_config(path: str, overrides: list[str]) -> dict:
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    for item in overrides:
        key, _, raw = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if leaf not in node:
            raise SystemExit(f"override {item!r}: unknown key {key!r} (known: {sorted(node)})")
        node[leaf] = yaml.safe_load(raw)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    import deepspeed

    backend = os.environ.get("MEGAMOE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = build_expert_parallel_groups(int(cfg["ep_size"]))
    model = apply_expert_parallel(build_model(**cfg["model"]), groups)
    micro = int(cfg["micro_batch"])
    ds_config = {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
                 "zero_optimization": {"stage": int(cfg["zero_stage"])}, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": 1.0, "steps_per_print": 10 ** 6}
    opt = torch.optim.AdamW(mds.moe_param_groups(model, weight_decay=0.01), lr=float(cfg["lr"]))
    engine = mds.initialize(model, ds_config, groups, optimizer=opt)
    data = global_batches(1, batch=micro * world, seq=int(cfg["seq"]), vocab=32)[0]
    losses = []
    for step in range(int(cfg["steps"])):
        loss = lm_loss(engine, data[rank * micro:(rank + 1) * micro])
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if rank == 0:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    # One write per line: ranks share the launcher's stdout, and a print() is two writes (text,
    # then newline) that another rank's output can land between.
    line = "EP_SMOKE_RESULT " + json.dumps({"rank": rank, "world": world, "ep_size": groups.ep_size,
                                            "losses": losses})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
