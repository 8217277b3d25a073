"""``megamoe demo``: a one-minute CPU demo that trains a small model of megamoe layers.

The task is a synthetic regression whose inputs come from several clusters, each with
its own target map, so routing tokens to specialised experts pays off. It prints the
training loss falling and the final expert load.
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--router", default="topk", help="router name (default topk)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig

    if args.steps <= 0:
        print(f"megamoe demo: error: --steps={args.steps} is invalid: must be a positive integer", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    dim, clusters = 32, 8
    centers = torch.randn(clusters, dim) * 3
    maps = torch.randn(clusters, dim, dim) / dim ** 0.5

    def batch(n: int = 512):
        c = torch.randint(clusters, (n,))
        x = centers[c] + torch.randn(n, dim)
        y = torch.tanh(torch.einsum("nd,nde->ne", x, maps[c]))
        return x, y

    cfg = MoEConfig(hidden_size=dim, num_experts=args.experts, experts=ExpertConfig(intermediate_size=64),
                    router=RouterConfig(name=args.router, top_k=args.top_k, aux_loss_coef=0.01))

    class Block(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.moe = MoELayer(cfg, layer_index=i)

        def forward(self, h):
            return h + self.moe(self.norm(h))

    model = nn.Sequential(Block(0), Block(1), nn.LayerNorm(dim), nn.Linear(dim, dim))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = sum(p.numel() for p in model.parameters())
    print(f"megamoe demo: 2 MoE layers x {args.experts} experts (top-{args.top_k}, router {args.router!r}), "
          f"{params / 1e3:.0f}k parameters")
    start, first = time.time(), None
    for step in range(1, args.steps + 1):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        if step == 1 or step % max(1, args.steps // 10) == 0:
            stats = model[0].moe.last_stats
            print(f"step {step:4d}  loss {loss.item():.4f}  max_vio {float(stats.max_vio):.3f}  "
                  f"aux {float(stats.aux_loss):.4f}")
    final = loss.item()
    load = model[0].moe.last_stats.tokens_per_expert_E.tolist()
    print(f"loss {first:.4f} -> {final:.4f} in {time.time() - start:.1f}s; layer-0 tokens per expert {load}")
    return 0 if final < first else 1
