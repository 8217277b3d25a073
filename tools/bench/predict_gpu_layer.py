#!/usr/bin/env python
"""Predict (not measure) one MoE layer's forward+backward time on an H100 from the bytes each
kernel moves and the FLOPs each GEMM does: a roofline model of megamoe's Triton path.

Shape legend: T tokens, H hidden size, I expert intermediate size, E experts, K experts per
token, R = T*K routed rows. bf16 activations (2 bytes), fp32 router.

Each memory-bound kernel takes bytes / bandwidth; each grouped GEMM takes FLOPs / its rate.
The GEMM rates come from the issue's H100 measurements: Qwen3-like, the six grouped GEMMs at
~570 TFLOP/s (profile); DeepSeek-like, 26 ms for 17.3 TFLOP (~665 TFLOP/s, profile);
Mixtral-like, no profile: 640 TFLOP/s assumed (its dense SwiGLU of the same FLOPs ran at 607
TFLOP/s including its own glue); the two small shapes: 300 TFLOP/s assumed (small groups).
Small ops (router softmax/top-k, the sort, index bookkeeping) are charged a fixed few
microseconds of GPU time each.

The host side is modelled separately: the kernel-launching ops one forward+backward
dispatches (counted here on CPU on a tiny layer, the Triton path under the interpreter)
times a per-op cost, plus an extra cost per torch.library custom-op call (its Python
wrapper). The per-op cost is calibrated on the issue's small shapes, which are host bound:
megamoe's previous path (100 such ops, counted the same way on that code) took 3.03 ms on
coarse, the sort + grouped_mm layer (56 ops) 2.01 ms, HF's grouped_mm block (59 ops)
2.52 ms: 30-42 us per op, GPU time and their host syncs included; 28 us is assumed for a
path without syncs (host and GPU overlap). A layer takes the larger of its GPU and host
times, which decides the two small shapes.

    python tools/bench/predict_gpu_layer.py                    # the tables (markdown)
    python tools/bench/predict_gpu_layer.py --launch-us 20     # a faster host
"""
from __future__ import annotations

import argparse
import os
import sys

SHAPES = {  # name: (T, H, I, E, K), as tools/bench/bench_layer.py
    "qwen3": (16384, 2048, 768, 128, 8),
    "deepseek": (8192, 7168, 2048, 64, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
    "coarse": (4096, 512, 1024, 8, 2),
    "fine": (4096, 512, 128, 64, 8),
}
# The H100 measurements (ms, fwd+bwd, bf16): megamoe before this path, and the grouped GEMM rate.
MEASURED_MS = {"qwen3": 15.3, "deepseek": 42.2, "mixtral": 32.4, "coarse": 3.03, "fine": 3.27}
GEMM_TFLOPS = {"qwen3": 570.0, "deepseek": 665.0, "mixtral": 640.0, "coarse": 300.0, "fine": 300.0}
DENSE_TFLOPS = 792.0
BF16, FP32, IDX = 2, 4, 8


def kernels(T: int, H: int, I: int, E: int, K: int) -> list[tuple[str, str, float]]:
    """(kernel, kind, amount): kind 'bytes' for memory-bound kernels, 'flops' for GEMMs,
    'small' for a count of tiny ops."""
    R = T * K
    return [
        ("router: x to fp32, logits GEMM, softmax, top-k (fwd)", "bytes", T * H * (BF16 + 2 * FP32) + 6 * T * E * FP32),
        ("sort slots, inverse map, offsets, row weights (fwd)", "small", 12),
        ("permute: gather x rows [R, H] (fwd)", "bytes", 2 * R * H * BF16 + R * IDX),
        ("grouped GEMM 1: [R, H] x [H, 2I] (fwd)", "flops", 2 * R * H * 2 * I),
        ("weighted SwiGLU on [R, 2I] (fwd)", "bytes", R * 2 * I * BF16 + R * I * BF16 + R * FP32),
        ("grouped GEMM 2: [R, I] x [I, H] (fwd)", "flops", 2 * R * I * H),
        ("combine: gather-sum to [T, H] (fwd)", "bytes", R * H * BF16 + T * H * BF16 + R * IDX),
        ("combine backward: gather g rows [R, H]", "bytes", 2 * R * H * BF16 + R * IDX),
        ("grouped GEMM 2 backward: dA and dW2", "flops", 2 * 2 * R * I * H),
        ("weighted SwiGLU backward (recompute; g_h, g_w)", "bytes", R * I * BF16 + 2 * R * 2 * I * BF16 + 2 * R * FP32),
        ("grouped GEMM 1 backward: dX and dW1", "flops", 2 * 2 * R * H * 2 * I),
        ("permute backward: gather-sum to [T, H]", "bytes", R * H * BF16 + T * H * BF16 + R * IDX),
        ("router backward (fp32 GEMMs, cast, add into g_x)", "bytes", T * H * (2 * FP32 + 3 * BF16) + 6 * T * E * FP32),
        ("router / aux-loss / weight-gather small ops (fwd+bwd)", "small", 40),
    ]


def predict(name: str, *, bandwidth: float, small_us: float) -> tuple[list[tuple[str, float]], float, float]:
    T, H, I, E, K = SHAPES[name]
    rate = GEMM_TFLOPS[name] * 1e12
    rows, gemm_ms, total = [], 0.0, 0.0
    for label, kind, amount in kernels(T, H, I, E, K):
        if kind == "bytes":
            ms = amount / bandwidth * 1e3
        elif kind == "flops":
            ms = amount / rate * 1e3
            gemm_ms += ms
        else:
            ms = amount * small_us * 1e-3
        if label.startswith("router: x to fp32"):
            ms += 2 * T * H * E / 50e12 * 1e3  # the fp32 logits GEMM (no tensor cores)
        if label.startswith("router backward"):
            ms += 2 * 2 * T * H * E / 50e12 * 1e3
        rows.append((label, ms))
        total += ms
    return rows, gemm_ms, total


# Ops that launch no kernel: metadata changes and uninitialised allocations.
METADATA_OPS = {"view", "_unsafe_view", "t", "transpose", "detach", "expand", "unsqueeze", "squeeze", "slice", "select",
                "promote_types", "alias", "as_strided", "permute", "reshape", "_reshape_alias", "split", "unbind",
                "empty", "empty_like", "new_empty", "empty_strided"}


def count_launches() -> dict[str, dict[str, int]]:
    """Kernel-launching ops dispatched by one forward+backward of a tiny bf16 layer (CPU; the
    Triton path under the interpreter), for megamoe's triton and grouped paths."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.custom = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (func.namespace == "aten" and func.__name__.split(".")[0] in METADATA_OPS):
                self.n += 1
                self.custom += func.namespace == "megamoe"
            return func(*args, **(kwargs or {}))

    out = {}
    for impl in ("triton", "grouped"):
        cfg = MoEConfig(hidden_size=64, num_experts=8, experts=ExpertConfig(intermediate_size=128, impl=impl),
                        router=RouterConfig(top_k=2, aux_loss_coef=0.01))
        layer = MoELayer(cfg).bfloat16()
        x = torch.randn(64, 64, dtype=torch.bfloat16)
        for counted in (False, True):  # the first step warms up; the second is counted
            layer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with Count() as c:
                layer(xi).backward(torch.ones(64, 64, dtype=torch.bfloat16))
        out[impl] = {"ops": c.n, "custom": c.custom}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidth", type=float, default=3.0, help="achieved HBM bandwidth, TB/s")
    p.add_argument("--small-us", type=float, default=4.0, help="GPU time of one tiny op, microseconds")
    p.add_argument("--launch-us", type=float, default=28.0, help="host time per kernel-launching op, microseconds")
    p.add_argument("--custom-op-us", type=float, default=30.0, help="extra host time per custom-op call, microseconds")
    args = p.parse_args(argv)
    bw = args.bandwidth * 1e12
    launches = count_launches()
    ours = launches["triton"]
    host_ms = (ours["ops"] * args.launch_us + ours["custom"] * args.custom_op_us) * 1e-3
    print(f"PREDICTION (untimed): H100, {args.bandwidth} TB/s achieved HBM bandwidth, tiny ops "
          f"{args.small_us} us, bf16, dropless top-k, forward+backward. Host: {ours['ops']} kernel-launching ops "
          f"per step on the triton path ({ours['custom']} of them custom ops; {launches['grouped']['ops']} on the "
          f"grouped path) x {args.launch_us} us + {args.custom_op_us} us per custom op = {host_ms:.2f} ms.\n")
    summary = []
    for name in SHAPES:
        T, H, I, E, K = SHAPES[name]
        rows, gemm_ms, total = predict(name, bandwidth=bw, small_us=args.small_us)
        if name in ("qwen3", "deepseek", "mixtral"):
            print(f"### {name}: T={T} H={H} I={I} E={E} K={K}\n\n| kernel | ms |\n|---|---:|")
            for label, ms in rows:
                print(f"| {label} | {ms:.3f} |")
            print(f"| **total** | **{total:.2f}** |\n")
        layer_ms = max(total, host_ms)
        flops = 18.0 * T * K * H * I
        summary.append((name, gemm_ms, total - gemm_ms, total, layer_ms, flops / (layer_ms * 1e-3) / 1e12))
    print("| shape | GEMMs ms | other GPU ms | GPU ms | predicted layer ms (max with host) | TFLOP/s | of 792 "
          "| megamoe measured before (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, gemm_ms, glue, total, layer_ms, tflops in summary:
        print(f"| {name} | {gemm_ms:.2f} | {glue:.2f} | {total:.2f} | {layer_ms:.2f} | {tflops:.0f} "
              f"| {100 * tflops / DENSE_TFLOPS:.0f}% | {MEASURED_MS[name]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
