"""Expert-parallel MoE layer step time: megamoe vs DeepSpeed's MoE, EP=2 on 2 processes.

For each shape, both layers run forward + backward on the same per-rank token count with
``ep_size=2`` over gloo (CPU) or NCCL (2 GPUs): megamoe's MoELayer sharded by
``apply_expert_parallel`` (dropless, variable-split all-to-all) and
``deepspeed.moe.layer.MoE`` with a SwiGLU expert of the same size (``drop_tokens=False``,
i.e. dropless too, and ``capacity_factor=1.25`` for the capacity-mode comparison when
``--capacity``). The time of one step is the slowest rank's; the table gives the median
over ``--iters`` steps after ``--warmup`` steps, and the DeepSpeed / megamoe ratio
(> 1: megamoe faster).

    python tools/bench/bench_ep.py                       # T=4096 per rank, both shapes
    python tools/bench/bench_ep.py --tokens 1024         # shorter, for a shared 2-core box
Prints the table; ``--out PATH`` also writes it there (atomically), e.g.
``--out tools/results/bench_ep.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megamoe.atomic import atomic_write_text  # noqa: E402
from megamoe.config import ExpertConfig, MoEConfig, RouterConfig  # noqa: E402
from megamoe.layer import MoELayer  # noqa: E402
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups  # noqa: E402
from megamoe.testing import default_backend, run_distributed  # noqa: E402

SHAPES = {  # name: (hidden H, intermediate I, experts E, top-k K)
    "coarse": (512, 1024, 8, 2),
    "fine": (512, 128, 64, 8),
}


class SwiGLU(nn.Module):
    """The expert DeepSpeed's MoE replicates: the same math as megamoe's swiglu expert."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _time_steps(fn, *, warmup: int, iters: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(elapsed))
    return times


def _worker(rank: int, world: int, shape: str, tokens: int, warmup: int, iters: int,
            capacity: float | None) -> dict:
    import megamoe.integrations.deepspeed  # noqa: F401  (first: it quiets DeepSpeed's CPU banner)
    import deepspeed
    from deepspeed.moe.layer import MoE

    hidden, inter, experts, top_k = SHAPES[shape]
    # megamoe.testing hides CUDA from CPU (gloo) ranks, so a visible GPU means NCCL, one per rank.
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    torch.manual_seed(rank)
    x = torch.randn(tokens, hidden, device=device)
    grad = torch.randn(tokens, hidden, device=device)

    cfg = MoEConfig(hidden_size=hidden, num_experts=experts, experts=ExpertConfig(intermediate_size=inter),
                    router=RouterConfig(top_k=top_k, aux_loss_coef=0.01, options={"capacity_factor": capacity}))
    torch.manual_seed(0)
    ours = apply_expert_parallel(MoELayer(cfg), build_expert_parallel_groups(world)).to(device)

    def step_ours() -> None:
        xi = x.detach().requires_grad_(True)
        ours(xi).backward(grad)

    theirs = MoE(hidden, SwiGLU(hidden, inter), num_experts=experts, ep_size=world, k=top_k,
                 capacity_factor=capacity or 1.0, eval_capacity_factor=capacity or 1.0, min_capacity=0,
                 drop_tokens=capacity is not None, use_rts=False, top2_2nd_expert_sampling=False).to(device)
    theirs.set_deepspeed_parallelism()

    def step_theirs() -> None:
        xi = x.detach().requires_grad_(True)
        out, aux, _ = theirs(xi.unsqueeze(0))
        torch.autograd.backward([out.squeeze(0), aux], [grad, torch.ones_like(aux) * 0.01])

    results = {}
    # Alternate the two so slow phases of a shared machine hit both.
    for name, fn in (("megamoe", step_ours), ("deepspeed", step_theirs), ("megamoe2", step_ours),
                     ("deepspeed2", step_theirs)):
        results[name] = _time_steps(fn, warmup=warmup, iters=iters)
    return {"megamoe": results["megamoe"] + results["megamoe2"],
            "deepspeed": results["deepspeed"] + results["deepspeed2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per phase (2 phases per layer)")
    parser.add_argument("--capacity", type=float, default=None,
                        help="capacity factor for both (default: dropless for both)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--out", help="write the markdown table to this file (atomically)")
    args = parser.parse_args()
    if args.tokens < 1 or args.iters < 1:
        parser.error("--tokens and --iters must be positive")
    env = {"MEGAMOE_THREADS_PER_RANK": str(args.threads)}
    rows = []
    for shape in args.shapes:
        res = run_distributed(_worker, 2, shape, args.tokens, args.warmup, args.iters, args.capacity, env=env)[0]
        ours, theirs = statistics.median(res["megamoe"]), statistics.median(res["deepspeed"])
        h, i, e, k = SHAPES[shape]
        rows.append(f"| {shape} | {args.tokens} | {h} | {i} | {e} | {k} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | "
                    f"{theirs / ours:.2f} |")
        print(rows[-1], flush=True)
    mode = "dropless" if args.capacity is None else f"capacity factor {args.capacity}"
    backend = "NCCL, 2 GPUs" if default_backend(2) == "nccl" else f"gloo, CPU, {args.threads} thread(s) per rank"
    table = "\n".join([
        f"EP=2 on 2 processes ({backend}), {mode}; forward+backward of one MoE layer, median of "
        f"{2 * args.iters} steps, slowest rank. Command: `python tools/bench/bench_ep.py {' '.join(sys.argv[1:])}`",
        "",
        "| shape | tokens/rank | H | I | E | K | megamoe ms | DeepSpeed MoE ms | DS / megamoe |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
