"""Kool-style toy task: skip vs balanced vs biased top-1 with capacity, on a mixture of regressions.

Inputs come from C clusters (one per expert), each with its own nonlinear target map; a single
MoE layer with E = C small experts must learn to route each cluster to one expert and fit it.
Every batch is routed under capacity pressure (capacity factor 1). Two data regimes: uniform
cluster frequencies, and skewed ones (the balanced router must then send some tokens to the
"wrong" expert; biased top-k drops overflow). The score is the held-out MSE with every token
sent to its most likely expert (no capacity), median over seeds; lower is better. Purity: the
share of held-out tokens routed to their cluster's majority expert (1 = clean specialisation).

    PYTHONPATH=$PWD python tools/experiments/exp_kool_toy.py --out tools/results/routers_part1_kool.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.atomic import atomic_write_text
from megamoe.train.objectives import estimator_loss

ROUTERS = {
    "topk-cap (biased)": dict(name="topk", top_k=1, aux_loss_coef=0.01, options={"capacity_factor": 1.0,
                                                                                 "normalize_weights": False}),
    "skip": dict(name="skip", top_k=1, aux_loss_coef=0.0, options={"capacity_factor": 1.0}),
    "balanced": dict(name="balanced", top_k=1, aux_loss_coef=0.0),
}
REGIMES = {"uniform": [0.25, 0.25, 0.25, 0.25], "skewed": [0.4, 0.3, 0.2, 0.1]}


class Task:
    def __init__(self, seed: int, dim: int, clusters: int) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        self.centers = torch.randn(clusters, dim, generator=g) * 2.0
        self.maps = torch.randn(clusters, dim, dim, generator=g) / dim ** 0.5
        self.dim = dim

    def batch(self, n: int, freqs: list[float], g: torch.Generator,
              with_clusters: bool = False):
        c = torch.multinomial(torch.tensor(freqs), n, replacement=True, generator=g)
        x = self.centers[c] + 0.5 * torch.randn(n, self.dim, generator=g)
        y = torch.tanh(torch.einsum("nd,nde->ne", x, self.maps[c]))
        return (x, y, c) if with_clusters else (x, y)


def evaluate(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
             weighted: bool) -> tuple[float, float]:
    """Held-out MSE, and purity: the share of tokens sent to their cluster's majority expert."""
    with torch.no_grad():
        logits = layer.router.logits(x)
        e = logits.argmax(-1)
        y_all = layer.experts.forward_all(x)
        out = y_all[e, torch.arange(x.shape[0])]
        if weighted:  # the top-k model's output is p * f_e(x)
            out = out * torch.softmax(logits, -1).gather(1, e[:, None])
        majority = torch.stack([torch.bincount(e[c == k], minlength=layer.config.num_experts).max()
                                for k in range(int(c.max()) + 1)]).sum()
        return float((out - y).square().mean()), float(majority) / x.shape[0]


def train(router_kw: dict, freqs: list[float], seed: int, steps: int, batch: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    dim, experts = 8, 4
    task = Task(seed, dim, experts)
    cfg = MoEConfig(hidden_size=dim, num_experts=experts,
                    experts=ExpertConfig(intermediate_size=32, activation="gelu"),
                    router=RouterConfig(**router_kw))
    layer = MoELayer(cfg)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    estimator = router_kw["name"] in ("skip", "balanced")
    for _ in range(steps):
        x, y = task.batch(batch, freqs, g)
        out = layer(x)
        token_loss = (out - y).square().mean(-1)
        loss = estimator_loss(layer, token_loss) if estimator else token_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    xt, yt, ct = task.batch(4096, freqs, torch.Generator().manual_seed(99), with_clusters=True)
    return evaluate(layer, xt, yt, ct, weighted=router_kw["name"] == "topk")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    rows = []
    for regime, freqs in REGIMES.items():
        for label, kw in ROUTERS.items():
            results = [train(kw, freqs, s, args.steps, args.batch) for s in range(args.seeds)]
            rows.append((regime, label, [r[0] for r in results], [r[1] for r in results]))
            print(regime, label, results, flush=True)
    lines = [f"Held-out MSE (argmax routing, no capacity), {args.steps} steps of {args.batch} tokens, "
             f"capacity factor 1, E=4, {args.seeds} seeds ({time.time() - start:.0f} s on 1 CPU thread). "
             "Lower is better.", "",
             "| cluster frequencies | router | median MSE | MSE per seed | median purity |",
             "|---|---|---:|---|---:|"]
    for regime, label, scores, purity in rows:
        lines.append(f"| {regime} {REGIMES[regime]} | {label} | {statistics.median(scores):.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in scores)} | {statistics.median(purity):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
