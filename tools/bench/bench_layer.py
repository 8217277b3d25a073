#!/usr/bin/env python
"""Benchmark one MoE layer: megamoe vs DeepSpeed's MoE vs HF Mixtral's block vs the dense floor.

Times forward+backward (median of --repeats runs after --warmup runs) and peak memory of
each implementation on identical shapes, in one run, and reports ratios to megamoe:

- ``megamoe``: MoELayer, dropless top-k softmax router with the aux loss on, its default
  expert implementation (``auto``: the Triton kernels + torch._grouped_mm on CUDA, the
  per-expert loop on CPU).
- ``megamoe_grouped``: the same layer with ``ExpertConfig(impl="grouped")`` (grouped_mm with
  plain torch glue: megamoe's CUDA path before the Triton kernels).
- ``megamoe_cap``: the layer under a capacity, ``capacity_factor=1.0`` (DeepSpeed's default):
  over-full experts drop slots; on one process the rows are padded to E*C (no host sync).
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` (its defaults: capacity_factor 1.0,
  drop_tokens, random token selection) with a SwiGLU expert of the same size; skipped with
  a note when deepspeed is not importable.
- ``hf``: transformers' ``MixtralSparseMoeBlock`` (v5 stacked experts) with the standalone
  block's default experts implementation (a per-expert loop).
- ``hf_grouped``: the same block with ``experts_implementation="grouped_mm"``.
- ``sort_gmm``: the plainest grouped-GEMM layer: softmax top-k router, one argsort of the
  slots, a row gather, three ``torch._grouped_mm`` (gate, up, down), weighting, index_add_.
- ``dense``: one SwiGLU MLP of width K*I on all T tokens: the same FLOPs as the routed
  experts, i.e. the compute floor an MoE layer can approach.

TFLOP/s counts the experts' FLOPs only, 18*T*K*H*I per forward+backward (6 in forward: three
GEMMs of 2*T*K*H*I; twice that in backward), the same for every implementation (DeepSpeed
and megamoe_cap drop slots and compute less). On CUDA the run also times a dense 8192^3 bf16 GEMM
(--gemm-ref) and reports each layer's TFLOP/s as a share of it, and checks megamoe against
its GPU targets (``SHARE_TARGETS``, ``FASTER_THAN``, peak memory; printed, and in the JSON).

Peak memory is measured on a worker's first forward+backward of an implementation (before
any warm-up, so memory the allocator retains cannot hide a peak): on CUDA
``torch.cuda.max_memory_allocated`` over the allocation before the step, exact even when one
worker process runs several implementations one after the other (the default on CUDA:
one process per shape); on CPU the rise of the peak resident set (``ru_maxrss``) over the
resident size just before the step, so there every (shape, implementation) runs in a fresh
subprocess. Timing is the median of the later runs. Results are written only with --json.

    python tools/bench/bench_layer.py                       # both small shapes, fp32, CPU peers
    python tools/bench/bench_layer.py --shapes fine --json out.json
    python tools/bench/bench_layer.py --device cuda         # all shapes and peers, bf16, median of 10
    python tools/bench/bench_layer.py --threads 1 --clock cpu  # CPU time: usable on a loaded machine
"""
from __future__ import annotations

import argparse
import gc
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
    "qwen3": (16384, 2048, 768, 128, 8),      # Qwen3-30B-A3B-like
    "deepseek": (8192, 7168, 2048, 64, 8),    # DeepSeek-V3-like, 64 experts
    "mixtral": (8192, 4096, 14336, 8, 2),     # Mixtral-8x7B-like
}
# The layer's GPU targets (one H100, bf16, beside the peers in one run): megamoe's TFLOP/s as a
# share of the dense GEMM's, at least this much; faster than each of FASTER_THAN at every
# shape; peak memory no higher than its own path before the Triton kernels (megamoe_grouped).
SHARE_TARGETS = {"qwen3": 0.50, "deepseek": 0.62, "mixtral": 0.72}
FASTER_THAN = ("hf_grouped", "sort_gmm")
IMPLS = ("megamoe", "megamoe_grouped", "megamoe_cap", "deepspeed", "hf", "hf_grouped", "sort_gmm", "dense")
# Defaults per device: the CPU table keeps its historical columns and shapes.
DEFAULTS = {"cpu": dict(shapes="coarse,fine", impls="megamoe,deepspeed,hf,dense", dtype="fp32", warmup=2, repeats=5,
                        gemm_ref=0),
            "cuda": dict(shapes="qwen3,deepseek,mixtral,coarse,fine", impls=",".join(IMPLS), dtype="bf16", warmup=3,
                         repeats=10, gemm_ref=8192)}


@dataclass
class Result:
    shape: str
    impl: str
    ms: float
    peak_mb: float
    ok: bool = True
    error: str = ""
    tflops: float = float("nan")
    share_of_gemm: float = float("nan")


def expert_flops(T: int, H: int, I: int, K: int) -> float:
    """Forward+backward FLOPs of the routed experts: 3 GEMMs of 2*T*K*H*I, times 3."""
    return 18.0 * T * K * H * I


def target_checks(shape: str, results: list[Result]) -> list[dict]:
    """megamoe's results at ``shape`` against the targets above, one row per check that this
    run measured (a peer that was not run or failed gives no row)."""
    by = {r.impl: r for r in results if r.ok}
    mm = by.get("megamoe")
    if mm is None:
        return []
    checks = []
    share = SHARE_TARGETS.get(shape)
    if share is not None and mm.share_of_gemm == mm.share_of_gemm:  # not NaN: a GEMM was timed
        checks.append(dict(check="share of the dense GEMM", value=mm.share_of_gemm, target=f">= {share:.0%}",
                           met=mm.share_of_gemm >= share))
    for peer in FASTER_THAN:
        if peer in by:
            checks.append(dict(check=f"ms vs {peer}", value=mm.ms, target=f"< {by[peer].ms:.2f}",
                               met=mm.ms < by[peer].ms))
    if "megamoe_grouped" in by:
        before = by["megamoe_grouped"].peak_mb
        checks.append(dict(check="peak MB vs megamoe_grouped", value=mm.peak_mb, target=f"<= {before:.0f}",
                           met=mm.peak_mb <= before))
    return checks


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(impl: str, T: int, H: int, I: int, E: int, K: int, dtype, device):
    from torch import nn

    if impl in ("megamoe", "megamoe_grouped", "megamoe_cap"):
        from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
        cfg = MoEConfig(hidden_size=H, num_experts=E,
                        experts=ExpertConfig(intermediate_size=I, impl="grouped" if impl == "megamoe_grouped" else "auto"),
                        router=RouterConfig(top_k=K, aux_loss_coef=0.01,
                                            options={"capacity_factor": 1.0 if impl == "megamoe_cap" else None}))
        return MoELayer(cfg).to(device=device, dtype=dtype)
    if impl == "sort_gmm":
        return _sort_gmm_module(H, I, E, K).to(device=device, dtype=dtype)
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
    if impl in ("hf", "hf_grouped"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        extra = {"experts_implementation": "grouped_mm"} if impl == "hf_grouped" else {}
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, **extra)
        if extra and getattr(cfg, "_experts_implementation", None) != "grouped_mm":
            raise RuntimeError("this transformers version has no experts_implementation='grouped_mm'")
        block = MixtralSparseMoeBlock(cfg)
        for p in block.parameters():
            nn.init.normal_(p, std=0.02)
        return block.to(device=device, dtype=dtype)
    if impl == "deepspeed":
        try:
            import deepspeed
        except ImportError as exc:
            raise _Skip(f"deepspeed is not importable ({exc})") from None
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


class _Skip(Exception):
    """A peer that cannot run here (not installed): reported as skipped, not as a failure."""


def _sort_gmm_module(H: int, I: int, E: int, K: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SortGroupedMM(nn.Module):
        """Softmax top-k, argsort of the slots, gather, three torch._grouped_mm, weight, index_add_."""

        def __init__(self):
            super().__init__()
            self.router = nn.Linear(H, E, bias=False)
            self.w_gate = nn.Parameter(torch.randn(E, H, I) * H ** -0.5)
            self.w_up = nn.Parameter(torch.randn(E, H, I) * H ** -0.5)
            self.w_down = nn.Parameter(torch.randn(E, I, H) * I ** -0.5)

        def forward(self, x):
            x2 = x.reshape(-1, H)
            probs = torch.softmax(self.router(x2).float(), dim=-1)
            w_TK, ids_TK = probs.topk(K, dim=-1)
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
            order = torch.argsort(ids_TK.reshape(-1), stable=True)
            offs = torch.bincount(ids_TK.reshape(-1), minlength=E).cumsum(0).to(torch.int32)
            tok = order // K
            xs = x2[tok]
            a = F.silu(torch._grouped_mm(xs, self.w_gate, offs=offs)) * torch._grouped_mm(xs, self.w_up, offs=offs)
            y = torch._grouped_mm(a, self.w_down, offs=offs) * w_TK.reshape(-1)[order].to(x2.dtype).unsqueeze(1)
            return torch.zeros_like(x2).index_add_(0, tok, y).view_as(x)

    return SortGroupedMM()


def _measure(impl: str, shape: str, dims, dtype, device, warmup: int, repeats: int, clock_name: str) -> Result:
    import torch
    try:
        torch.manual_seed(0)
        T, H, I, E, K = dims
        with device:  # parameters are created (and initialised) on the device
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
        return Result(shape, impl, statistics.median(times), max(peak, 0.0))
    except _Skip as exc:
        return Result(shape, impl, float("nan"), float("nan"), ok=False, error=f"skipped: {exc}")
    except Exception as exc:  # report, don't hide: the table shows the failure
        return Result(shape, impl, float("nan"), float("nan"), ok=False, error=f"{type(exc).__name__}: {exc}")


def _gemm_ms(n: int, device, repeats: int) -> float:
    """Median time of one dense n x n x n bf16 GEMM (the card's practical peak)."""
    import torch
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _worker(impls: list[str], shape: str, dims, dtype_name: str, device_name: str, warmup: int, repeats: int,
            threads: int, clock_name: str, gemm_ref: int, conn) -> None:
    import torch
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = torch.device(device_name)
    if gemm_ref:
        conn.send(("gemm", _gemm_ms(gemm_ref, device, repeats)))
    for impl in impls:
        conn.send(_measure(impl, shape, dims, dtype, device, warmup, repeats, clock_name))
        # Several implementations may share this process (CUDA): free the last one's memory
        # (its locals are gone once _measure returned) before the next is built.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_group(impls: list[str], shape: str, dims, args, *, gemm_ref: int = 0) -> tuple[list[Result], float | None]:
    """Run ``impls`` one after the other in one fresh worker process; (results, GEMM ms or None)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(impls, shape, dims, args.dtype, args.device, args.warmup, args.repeats,
                                             args.threads, args.clock, gemm_ref, child))
    proc.start()
    child.close()
    results: list[Result] = []
    gemm = None
    try:
        if gemm_ref:
            gemm = parent.recv()[1]
        for _ in impls:
            results.append(parent.recv())
    except EOFError:
        pass
    proc.join()
    for impl in impls[len(results):]:
        results.append(Result(shape, impl, float("nan"), float("nan"), ok=False,
                              error=f"worker died (exit {proc.exitcode})"))
    return results, gemm


def run_one(impl: str, shape: str, dims, args) -> Result:
    return run_group([impl], shape, dims, args)[0][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: "
                   f"{DEFAULTS['cpu']['shapes']} on CPU, all on CUDA)")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (default: "
                   f"{DEFAULTS['cpu']['impls']} on CPU, all on CUDA)")
    p.add_argument("--tokens", type=int, default=None, help="override T (tokens per batch)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 5 on CPU, "
                   "10 on CUDA)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (CPU)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (robust on a loaded machine with --threads 1)")
    p.add_argument("--gemm-ref", type=int, default=None,
                   help="also time a dense N^3 bf16 GEMM and report shares of it (default 8192 on CUDA, 0=off on CPU)")
    p.add_argument("--isolate", action="store_true",
                   help="one fresh process per (shape, implementation) also on CUDA (always so on CPU)")
    p.add_argument("--json", "--out", dest="json_path", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    kind = "cpu" if args.device == "cpu" else "cuda"
    for name in ("shapes", "impls", "dtype", "warmup", "repeats", "gemm_ref"):
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[kind][name])
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
    if args.gemm_ref and kind == "cpu":
        p.error("--gemm-ref times a bf16 GEMM on the GPU; use it only with --device cuda")

    # The targets are for bf16 at the full shapes, on a GPU.
    targets_apply = kind == "cuda" and args.dtype == "bf16" and args.tokens is None
    report = {"device": args.device, "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats,
              "threads": args.threads, "clock": args.clock, "flops": "18*T*K*H*I (experts only)", "shapes": {}}
    gemm_tflops = None
    for s in shapes:
        T, H, I, E, K = SHAPES[s]
        T = args.tokens or T
        dims = (T, H, I, E, K)
        print(f"\n== {s}: T={T} H={H} I={I} E={E} K={K} ({args.dtype}, {args.device}, "
              f"median of {args.repeats} fwd+bwd after {args.warmup} warm-up, {args.clock} time, "
              f"{args.threads} threads)", flush=True)
        want_gemm = args.gemm_ref if gemm_tflops is None else 0
        if kind == "cpu" or args.isolate:
            results, gemm_ms = [], None
            if want_gemm:
                gemm_ms = run_group([], s, dims, args, gemm_ref=want_gemm)[1]
            results += [run_one(i, s, dims, args) for i in impls]
        else:
            results, gemm_ms = run_group(impls, s, dims, args, gemm_ref=want_gemm)
        if gemm_ms is not None:
            gemm_tflops = 2.0 * args.gemm_ref ** 3 / (gemm_ms * 1e-3) / 1e12
            report["gemm"] = {"n": args.gemm_ref, "ms": gemm_ms, "tflops": gemm_tflops}
            print(f"dense {args.gemm_ref}^3 bf16 GEMM: {gemm_ms:.2f} ms = {gemm_tflops:.0f} TFLOP/s", flush=True)
        flops = expert_flops(T, H, I, K)
        for r in results:
            if r.ok:
                r.tflops = flops / (r.ms * 1e-3) / 1e12
                if gemm_tflops:
                    r.share_of_gemm = r.tflops / gemm_tflops
        by = {r.impl: r for r in results}
        mm = by.get("megamoe")
        print(f"{'impl':<16} {'ms':>9} {'TFLOP/s':>8} {'of GEMM':>8} {'peak MB':>9} {'speed vs it':>13}  note")
        for r in results:
            rel = ""
            if mm and mm.ok and r.ok and r.impl != "megamoe":
                rel = f"{r.ms / mm.ms:9.2f}x" if r.impl != "dense" else f"{r.ms / mm.ms:9.2f} (floor)"
            share = f"{100 * r.share_of_gemm:7.1f}%" if r.ok and gemm_tflops else ""
            note = r.error[:80] if not r.ok else ""
            print(f"{r.impl:<16} {r.ms:9.2f} {r.tflops:8.1f} {share:>8} {r.peak_mb:9.1f} {rel:>13}  {note}", flush=True)
        report["shapes"][s] = {"dims": dict(zip("THIEK", dims)), "results": [asdict(r) for r in results],
                               "targets": target_checks(s, results) if targets_apply else []}
        for c in report["shapes"][s]["targets"]:
            value = f"{c['value']:.1%}" if c["check"].startswith("share") else f"{c['value']:.2f}"
            print(f"target {c['check']}: {value} ({c['target']}) {'met' if c['met'] else 'NOT MET'}")
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
