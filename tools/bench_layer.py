#!/usr/bin/env python
"""Benchmark one MoE layer: megamoe vs DeepSpeed's MoE vs HF Mixtral's block vs the dense floor.

Times forward+backward (median of --repeats runs after --warmup runs) and peak memory of
each implementation on identical shapes, in one run, and reports ratios to megamoe:

- ``megamoe``: MoELayer, dropless top-k softmax router with the aux loss on.
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` (its defaults: capacity_factor 1.0,
  drop_tokens, random token selection) with a SwiGLU expert of the same size.
- ``hf``: transformers' ``MixtralSparseMoeBlock`` (v5 stacked experts).
- ``dense``: one SwiGLU MLP of width K*I on all T tokens: the same FLOPs as the routed
  experts, i.e. the compute floor an MoE layer can approach.

Every (shape, implementation) runs in a fresh subprocess so peak memory is measured in
isolation, on the process's first forward+backward (before any warm-up, so memory the
allocator retains cannot hide a peak): on CUDA ``torch.cuda.max_memory_allocated`` over the
allocation before the step; on CPU the rise of the peak resident set (``ru_maxrss``) over
the resident size just before the step. Timing is the median of the later runs.

    python tools/bench_layer.py                       # both shapes, fp32, all implementations
    python tools/bench_layer.py --shapes fine --json out.json
    python tools/bench_layer.py --device cuda --dtype bf16
    python tools/bench_layer.py --threads 1 --clock cpu  # CPU time: usable on a loaded machine
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

SHAPES = {
    # name: (T, H, I, E, K)
    "coarse": (4096, 512, 1024, 8, 2),
    "fine": (4096, 512, 128, 64, 8),
}
IMPLS = ("megamoe", "deepspeed", "hf", "dense")


@dataclass
class Result:
    shape: str
    impl: str
    ms: float
    peak_mb: float
    ok: bool = True
    error: str = ""


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(impl: str, T: int, H: int, I: int, E: int, K: int, dtype, device):
    from torch import nn

    if impl == "megamoe":
        from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
        cfg = MoEConfig(hidden_size=H, num_experts=E, experts=ExpertConfig(intermediate_size=I),
                        router=RouterConfig(top_k=K, aux_loss_coef=0.01))
        return MoELayer(cfg).to(device=device, dtype=dtype)
    if impl == "dense":
        class Dense(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_up = nn.Linear(H, 2 * I * K, bias=False)
                self.down = nn.Linear(I * K, H, bias=False)

            def forward(self, x):
                g, u = self.gate_up(x).chunk(2, dim=-1)
                return self.down(nn.functional.silu(g) * u)
        return Dense().to(device=device, dtype=dtype)
    if impl == "hf":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        block = MixtralSparseMoeBlock(cfg)
        for p in block.parameters():
            nn.init.normal_(p, std=0.02)
        return block.to(device=device, dtype=dtype)
    if impl == "deepspeed":
        import deepspeed
        from deepspeed.moe.layer import MoE

        class SwiGLU(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_up = nn.Linear(H, 2 * I, bias=False)
                self.down = nn.Linear(I, H, bias=False)

            def forward(self, x):
                g, u = self.gate_up(x).chunk(2, dim=-1)
                return self.down(nn.functional.silu(g) * u)

        os.environ.update({"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)

        class Wrapped(nn.Module):
            def __init__(self):
                super().__init__()
                self.moe = MoE(hidden_size=H, expert=SwiGLU(), num_experts=E, ep_size=1, k=K)

            def forward(self, x):
                out, l_aux, _ = self.moe(x)
                return out + 0.0 * l_aux  # keep its aux loss in the graph, like megamoe's

        return Wrapped().to(device=device, dtype=dtype)
    raise ValueError(impl)


def _worker(impl: str, shape: str, dims, dtype_name: str, device_name: str, warmup: int, repeats: int,
            threads: int, clock_name: str, conn) -> None:
    try:
        import torch
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        device = torch.device(device_name)
        T, H, I, E, K = dims
        module = _build(impl, T, H, I, E, K, dtype, device)
        x = torch.randn(1, T, H, device=device, dtype=dtype)
        upstream = torch.randn(1, T, H, device=device, dtype=dtype)

        def step():
            xi = x.detach().requires_grad_(True)
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(upstream)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        # Memory: the first forward+backward of a fresh process, measured from just before it,
        # so memory the allocator kept from earlier steps cannot hide a transient peak.
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mb()
        step()
        sync()
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        for _ in range(warmup):
            step()
        clock = time.process_time if clock_name == "cpu" else time.perf_counter
        times = []
        for _ in range(repeats):
            module.zero_grad(set_to_none=True)
            sync()
            t0 = clock()
            step()
            sync()
            times.append((clock() - t0) * 1000)
        conn.send(Result(shape, impl, statistics.median(times), max(peak, 0.0)))
    except Exception as exc:  # report, don't hide: the table shows the failure
        conn.send(Result(shape, impl, float("nan"), float("nan"), ok=False, error=f"{type(exc).__name__}: {exc}"))


def run_one(impl: str, shape: str, dims, args) -> Result:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(impl, shape, dims, args.dtype, args.device, args.warmup, args.repeats,
                                             args.threads, args.clock, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = Result(shape, impl, float("nan"), float("nan"), ok=False, error=f"worker died (exit {proc.exitcode})")
    proc.join()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="coarse,fine", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--tokens", type=int, default=None, help="override T (tokens per batch)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (CPU)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (robust on a loaded machine with --threads 1)")
    p.add_argument("--json", dest="json_path", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    for i in impls:
        if i not in IMPLS:
            p.error(f"unknown implementation {i!r}; known: {', '.join(IMPLS)}")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures host CPU time; use it only with --device cpu")
    if args.repeats < 5:
        p.error("--repeats must be at least 5 (median of >= 5 runs)")

    report = {"device": args.device, "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads,
              "clock": args.clock, "shapes": {}}
    for s in shapes:
        T, H, I, E, K = SHAPES[s]
        T = args.tokens or T
        dims = (T, H, I, E, K)
        print(f"\n== {s}: T={T} H={H} I={I} E={E} K={K} ({args.dtype}, {args.device}, "
              f"median of {args.repeats} fwd+bwd after {args.warmup} warm-up, {args.clock} time, "
              f"{args.threads} threads)", flush=True)
        results = [run_one(i, s, dims, args) for i in impls]
        by = {r.impl: r for r in results}
        mm = by.get("megamoe")
        print(f"{'impl':<10} {'ms':>9} {'peak MB':>9} {'speed vs it':>13}  note")
        for r in results:
            rel = ""
            if mm and mm.ok and r.ok and r.impl != "megamoe":
                rel = f"{r.ms / mm.ms:9.2f}x" if r.impl != "dense" else f"{r.ms / mm.ms:9.2f} (floor)"
            note = r.error[:80] if not r.ok else ""
            print(f"{r.impl:<10} {r.ms:9.1f} {r.peak_mb:9.1f} {rel:>13}  {note}", flush=True)
        report["shapes"][s] = {"dims": dict(zip("THIEK", dims)), "results": [asdict(r) for r in results]}
        if mm and mm.ok:
            ratios = {f"megamoe_speedup_vs_{r.impl}": r.ms / mm.ms for r in results if r.ok and r.impl != "megamoe"}
            report["shapes"][s]["ratios"] = ratios
            print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    if args.json_path:
        from megamoe.atomic import atomic_write_text
        atomic_write_text(args.json_path, json.dumps(report, indent=2))
        print(f"\nwrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
