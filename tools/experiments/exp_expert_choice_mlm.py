"""Expert Choice vs token-choice top-1 and top-2 on a small bidirectional masked LM.

Corpus (generated locally, no download): sentences from a mixture of "topics", each topic a
sparse random bigram chain over a 64-word vocabulary, so which expert suits a token depends on
its context. Model: token + position embeddings, 2 pre-norm bidirectional transformer blocks
(d=64, 4 heads) whose MLPs are MoE layers with E=8 swiglu experts (I=128), and a tied output
head. Masked-LM loss on 15% of positions. Routers: ``topk`` top-1 and top-2 with capacity
factor 1.25 and the Switch/GShard balance loss (0.01), and ``expert_choice`` with c=2 (about
top-2's expert compute). The score: optimizer steps until the held-out masked-LM loss (an
exponential moving average over evaluations) first reaches a target, the target being the
loss top-2 has at mid-run (``--target-frac``); median over seeds.

    PYTHONPATH=$PWD python tools/experiments/exp_expert_choice_mlm.py --out tools/results/routers_part1_ec.md
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.atomic import atomic_write_text

VOCAB, MASK_ID, SEQ = 64, 64, 32
ROUTERS = {
    "top-1 (c=1.25)": dict(name="topk", top_k=1, aux_loss_coef=0.01, options={"capacity_factor": 1.25}),
    "top-2 (c=1.25)": dict(name="topk", top_k=2, aux_loss_coef=0.01, options={"capacity_factor": 1.25}),
    "expert_choice c=2": dict(name="expert_choice", aux_loss_coef=0.0, options={"capacity_factor": 2.0}),
}


class Corpus:
    def __init__(self, seed: int, topics: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(topics, VOCAB, VOCAB, generator=g) * 3.0
        # Each topic allows few successors per word: sharp, topic-specific bigrams.
        keep = torch.rand(topics, VOCAB, VOCAB, generator=g) < 0.08
        self.trans = torch.softmax(torch.where(keep, logits, torch.full_like(logits, -1e9)), dim=-1)
        self.topics = topics

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        topic = torch.randint(self.topics, (n,), generator=g)
        tok = torch.randint(VOCAB, (n,), generator=g)
        seq = [tok]
        for _ in range(SEQ - 1):
            tok = torch.multinomial(self.trans[topic, tok], 1, generator=g).squeeze(1)
            seq.append(tok)
        return torch.stack(seq, dim=1)


def mask_batch(tokens: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.rand(tokens.shape, generator=g) < 0.15
    inputs = torch.where(chosen, torch.full_like(tokens, MASK_ID), tokens)
    targets = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return inputs, targets


class Block(nn.Module):
    def __init__(self, dim: int, router_kw: dict, index: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        cfg = MoEConfig(hidden_size=dim, num_experts=8, experts=ExpertConfig(intermediate_size=128),
                        router=RouterConfig(**router_kw))
        self.moe = MoELayer(cfg, layer_index=index)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.moe(self.norm2(h))


class MaskedLM(nn.Module):
    def __init__(self, router_kw: dict, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB + 1, dim)
        nn.init.normal_(self.emb.weight, std=0.02)  # tied head: keep initial logits near 0
        self.pos = nn.Parameter(torch.randn(SEQ, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, router_kw, i) for i in range(2)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = self.emb(inputs) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.norm(h) @ self.emb.weight.t()


def run(router_kw: dict, seed: int, steps: int, batch: int, eval_every: int, lr: float) -> list[tuple[int, float]]:
    torch.manual_seed(seed)
    corpus = Corpus(seed=1234)  # the same language for every router and seed
    model = MaskedLM(router_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    eval_g = torch.Generator().manual_seed(777)
    eval_inputs, eval_targets = mask_batch(corpus.sample(256, eval_g), eval_g)
    curve, ema = [], None
    for step in range(1, steps + 1):
        inputs, targets = mask_batch(corpus.sample(batch, g), g)
        model.train()
        loss = F.cross_entropy(model(inputs).reshape(-1, VOCAB + 1), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            model.eval()
            with torch.no_grad():
                ev = float(F.cross_entropy(model(eval_inputs).reshape(-1, VOCAB + 1), eval_targets.reshape(-1)))
            ema = ev if ema is None else 0.7 * ema + 0.3 * ev
            curve.append((step, ema))
    return curve


def steps_to(curve: list[tuple[int, float]], target: float) -> float:
    for step, value in curve:
        if value <= target:
            return step
    return math.inf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--target-frac", type=float, default=0.5,
                   help="target = top-2's loss at this fraction of the run (default 0.5)")
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), help="subset of the routers")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    curves = {}
    for label in args.routers:
        curves[label] = [run(ROUTERS[label], s, args.steps, args.batch, args.eval_every, args.lr)
                         for s in range(args.seeds)]
        print(label, [" ".join(f"{v:.2f}" for _, v in c) for c in curves[label]], flush=True)
    ref = "top-2 (c=1.25)"
    mid = max(1, round(args.target_frac * args.steps / args.eval_every)) - 1
    targets = [curves[ref][s][mid][1] for s in range(args.seeds)]
    lines = [f"Held-out masked-LM loss (EMA over evaluations every {args.eval_every} steps); {args.steps} steps of "
             f"{args.batch} x {SEQ} tokens; {args.seeds} seeds; lr {args.lr}; target per seed = top-2's loss at step "
             f"{(mid + 1) * args.eval_every} "
             f"({', '.join(f'{t:.3f}' for t in targets)}); {time.time() - start:.0f} s on 1 CPU thread.", "",
             "| router | final loss (median) | steps to target (per seed) | speed-up vs top-2 (median) |",
             "|---|---:|---|---:|"]
    base = [steps_to(curves[ref][s], targets[s]) for s in range(args.seeds)]
    for label, cs in curves.items():
        reach = [steps_to(cs[s], targets[s]) for s in range(args.seeds)]
        speed = statistics.median(b / r for b, r in zip(base, reach))
        final = statistics.median(c[-1][1] for c in cs)
        shown = ", ".join("not reached" if r == math.inf else str(r) for r in reach)
        lines.append(f"| {label} | {final:.3f} | {shown} | {speed:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
