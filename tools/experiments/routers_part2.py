"""Experiments for issue 8: CompeteSMoE vs top-k, THOR vs top-1 and dense, single-gated MoE
accuracy vs compute. Prints the tables; ``--out PATH`` also writes them (and a small PNG
beside it), e.g. ``--out tools/results/routers_part2.md``.

Usage (each part is a few CPU minutes; ``all`` runs the three)::

    OMP_NUM_THREADS=1 python tools/experiments/routers_part2.py all --seeds 0 1 2

The LM parts use a compact causal character LM defined here (megamoe.model was not on main
yet) on a locally generated four-domain corpus: arithmetic, template English, a motif
"genome", and toy code; each sequence starts with its domain's tag character.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.atomic import atomic_savefig, atomic_write_text
from megamoe.train.objectives import thor_loss
from megamoe.train.step_state import MoEStepState
from megamoe.research.single_gate import SingleGatedMoE, train_base, train_expert


# ------------------------------------------------------------------------------------------ corpus
WORDS = {"noun": "cat dog bird fox king queen ship tree river stone".split(),
         "verb": "sees likes takes finds moves holds".split(),
         "adj": "red old big small quiet bright".split()}
DOMAINS = ("math", "text", "dna", "code")


def _math(r: random.Random) -> str:
    a, b = r.randint(0, 99), r.randint(0, 99)
    op = r.choice("+-")
    return f"{a}{op}{b}={a + b if op == '+' else a - b};"


def _text(r: random.Random) -> str:
    return (f"the {r.choice(WORDS['adj'])} {r.choice(WORDS['noun'])} {r.choice(WORDS['verb'])} "
            f"the {r.choice(WORDS['noun'])}. ")


def _dna(r: random.Random) -> str:
    motif = r.choice(["acgt", "ggca", "tta", "cagg"])
    return "".join(r.choice("acgt") if r.random() < 0.2 else ch for ch in motif * r.randint(1, 3))


def _code(r: random.Random) -> str:
    v, k = r.choice("xyzab"), r.randint(1, 9)
    return r.choice([f"def f({v}): return {v}*{k}\n", f"for {v} in range({k}): print({v})\n",
                     f"if {v} > {k}: {v} = {v}-{k}\n"])


GEN = {"math": _math, "text": _text, "dna": _dna, "code": _code}
TAGS = {"math": "#", "text": "@", "dna": "%", "code": "$"}


def make_corpus(n_seq: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    r = random.Random(seed)
    texts, doms = [], []
    for i in range(n_seq):
        d = DOMAINS[i % len(DOMAINS)]
        s = TAGS[d]
        while len(s) < seq_len + 1:
            s += GEN[d](r)
        texts.append(s[:seq_len + 1])
        doms.append(DOMAINS.index(d))
    vocab = sorted(set("".join(texts)) | set("0123456789abcdefghijklmnopqrstuvwxyz +-=;.:*()<>\n#@%$"))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([[stoi[c] for c in t] for t in texts])
    return ids, torch.tensor(doms), vocab


# ------------------------------------------------------------------------------------------ LM
class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.mlp = heads, mlp

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, router: RouterConfig | None,
                 num_experts: int, inter: int) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(seq_len, dim))
        cfg = MoEConfig(hidden_size=dim, num_experts=num_experts,
                        experts=ExpertConfig(intermediate_size=inter, activation="gelu"),
                        router=router or RouterConfig(top_k=1, aux_loss_coef=0.0))
        self.moes = [MoELayer(cfg, layer_index=i, causal=True) for i in range(layers)]
        self.blocks = nn.ModuleList(Block(dim, 4, m) for m in self.moes)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def lm_data(seed: int, seq_len: int = 64):
    ids, doms, vocab = make_corpus(4096 + 512, seq_len, seed=1000)  # same corpus for every run
    return ids[:4096], ids[4096:], doms[4096:], len(vocab)


@torch.no_grad()
def lm_eval(model: TinyLM, val: Tensor, val_dom: Tensor) -> dict[str, float]:
    model.eval()
    logits = model(val[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(val.shape[0], -1).mean(1)
    model.train()
    out = {"val_loss": float(ce.mean())}
    for i, d in enumerate(DOMAINS):
        out[d] = float(ce[val_dom == i].mean())
    return out


def train_lm(router: RouterConfig | None, *, num_experts: int, seed: int, steps: int, thor_alpha: float | None = None,
             batch: int = 16, eval_modes: tuple[str, ...] = ("default",)) -> dict[str, object]:
    train, val, val_dom, vocab = lm_data(seed)
    torch.manual_seed(seed)
    model = TinyLM(vocab, 64, dim=64, layers=2, router=router, num_experts=num_experts, inter=128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    competed = 0
    state = MoEStepState(model)  # tells the layers the step (CompeteSMoE's schedule reads it)
    state.attach_to_optimizer(opt)
    t0 = time.process_time()  # CPU seconds: the machine is shared, wall time is not comparable
    for step in range(steps):
        idx = torch.randint(train.shape[0], (batch,), generator=gen)
        x, y = train[idx, :-1], train[idx, 1:]
        if thor_alpha is not None:
            loss = thor_loss(lambda: model(x), y, alpha=thor_alpha).loss
        else:
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        competed += sum(int(float(m.last_stats.extra.get("competition", torch.zeros(()))) > 0) for m in model.moes)
    cpu = time.process_time() - t0
    res: dict[str, object] = {"cpu_s": cpu, "competition_layer_steps": competed}
    for mode in eval_modes:
        if mode != "default":
            for m in model.moes:
                m.router.options = type(m.router.options)(**{**m.router.options.__dict__, "eval_mode": mode})
        torch.manual_seed(seed + 99)
        res[mode] = lm_eval(model, val, val_dom)
    return res


def _mean_sd(vals: list[float]) -> str:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f}"


def lm_table(rows: dict[str, list[dict]], key: str = "default") -> list[str]:
    lines = ["| model | val loss (nats/char) | " + " | ".join(DOMAINS) + " | train CPU s / run | competition layer-steps |",
             "|---|---|" + "---|" * len(DOMAINS) + "---|---|"]
    for name, runs in rows.items():
        k = key if key in runs[0] else "default"
        cells = [_mean_sd([r[k]["val_loss"] for r in runs])] + [_mean_sd([r[k][d] for r in runs]) for d in DOMAINS]
        cpu = sum(r["cpu_s"] for r in runs) / len(runs)
        comp = sum(r["competition_layer_steps"] for r in runs) / len(runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cpu:.1f} | {comp:.1f} |")
    return lines


def part_compete(seeds: list[int], steps: int) -> list[str]:
    e, k = 8, 2
    base = dict(top_k=k, aux_loss_coef=0.01)
    variants = {
        "top-k (k=2, E=8)": RouterConfig(name="topk", **base),
        "CompeteSMoE p=0.07 (warm-up 5%, ≤1 of 2 layers)": RouterConfig(name="compete", **base, options={
            "compete_prob": 0.07, "warmup_steps": steps // 20, "num_layers": 2, "max_compete_layers": 1}),
        "CompeteSMoE p=0.25 (warm-up 5%, both layers)": RouterConfig(name="compete", **base, options={
            "compete_prob": 0.25, "warmup_steps": steps // 20, "num_layers": 2}),
    }
    rows = {n: [train_lm(c, num_experts=e, seed=s, steps=steps) for s in seeds] for n, c in variants.items()}
    return [f"### CompeteSMoE vs top-k at equal steps ({steps} steps, batch 16x64 chars, seeds {seeds})", "",
            *lm_table(rows), ""]


def part_thor(seeds: list[int], steps: int) -> list[str]:
    e = 4
    stoch = RouterConfig(name="stochastic", top_k=1, options={"granularity": "batch"})
    rows = {
        "dense (one MLP of expert width)": [train_lm(RouterConfig(top_k=1, aux_loss_coef=0.0), num_experts=1,
                                                     seed=s, steps=steps) for s in seeds],
        f"top-1 Switch (E={e}, aux 0.01)": [train_lm(RouterConfig(top_k=1, aux_loss_coef=0.01), num_experts=e,
                                                     seed=s, steps=steps) for s in seeds],
    }
    thor = [train_lm(stoch, num_experts=e, seed=s, steps=steps, thor_alpha=1.0, eval_modes=("random", "ensemble"))
            for s in seeds]
    rows[f"THOR (E={e}, alpha=1), eval random expert"] = [{**r, "default": r["random"]} for r in thor]
    rows[f"THOR (E={e}, alpha=1), eval ensemble"] = [{**r, "default": r["ensemble"]} for r in thor]
    return [f"### THOR vs top-1 and dense at equal steps ({steps} steps; THOR runs two passes per step)", "",
            *lm_table(rows), ""]


# ------------------------------------------------------------------------------------------ single gate
def cls_data(seed: int, n: int, clusters: int = 8, dim: int = 16, classes: int = 10):
    g = torch.Generator().manual_seed(1234)  # the task is fixed; seed varies the sample
    centers = torch.randn(clusters, dim, generator=g) * 2.5
    maps = torch.randn(clusters, dim, classes, generator=g)
    # Half the clusters are easy (one dominant class), half need their own map.
    easy = torch.arange(clusters) < clusters // 2
    gs = torch.Generator().manual_seed(seed)
    c = torch.randint(clusters, (n,), generator=gs)
    x = centers[c] + torch.randn(n, dim, generator=gs)
    logits = torch.einsum("nd,ndv->nv", x - centers[c], maps[c])
    y = torch.where(easy[c], c % classes, logits.argmax(-1))
    return x, y


def part_single_gate(seeds: list[int]) -> tuple[list[str], list[tuple[str, float, float]]]:
    from torch.utils.flop_counter import FlopCounterMode

    thresholds: list[float | None] = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, None]
    acc = {t: [] for t in thresholds}
    flops = {t: [] for t in thresholds}
    frac = {t: [] for t in thresholds}
    for seed in seeds:
        torch.manual_seed(seed)
        x, y = cls_data(seed, 8000)
        xt, yt = cls_data(seed + 100, 4000)
        stem = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
        head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        model = SingleGatedMoE(stem, head, num_experts=8, feature_size=64)
        train_base(model, x, y, steps=1500, lr=3e-3, batch_size=128, seed=seed)
        model.reset_experts_from_base()
        model.eval()
        clusters = model.fit_gate(model.features(x), seed=seed)
        for e in range(8):
            mine = clusters == e
            train_expert(model, e, x[mine], y[mine], steps=300, lr=3e-3, batch_size=128, seed=seed)
        model.eval()
        with torch.no_grad():
            for t in thresholds:
                counter = FlopCounterMode(display=False)
                with counter:
                    out = model(xt, exit_threshold=t)
                acc[t].append(float((out.log_probs_NV.argmax(-1) == yt).float().mean()))
                flops[t].append(counter.get_total_flops() / xt.shape[0])
                frac[t].append(out.expert_fraction)
    base_flops = sum(flops[0.0]) / len(seeds)
    lines = [f"### Single-gated MoE: accuracy vs compute (8 experts, 8-cluster 10-class task, seeds {seeds})", "",
             "| exit threshold (base max-prob) | test accuracy | samples running an expert | FLOPs / sample | vs base |",
             "|---|---|---|---|---|"]
    points = []
    for t in thresholds:
        f = sum(flops[t]) / len(seeds)
        name = "0 (base alone)" if t == 0.0 else ("none (always ensemble)" if t is None else f"{t}")
        lines.append(f"| {name} | {_mean_sd(acc[t])} | {sum(frac[t]) / len(seeds):.3f} | {f:.0f} | "
                     f"{f / base_flops:.2f}x |")
        points.append((name, f / base_flops, sum(acc[t]) / len(seeds)))
    return lines + [""], points


def _plot(points: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-")
    for name, c, a in points:
        ax.annotate(name.split(" ")[0], (c, a), fontsize=7, textcoords="offset points", xytext=(3, -8))
    ax.set_xlabel("FLOPs per sample / base FLOPs")
    ax.set_ylabel("test accuracy")
    ax.set_title("single-gated MoE: early-exit thresholds", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, format="png")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["compete", "thor", "single_gate", "all"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="LM optimizer steps (default 400)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the tables to this markdown file, keeping other parts' sections (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    parts = ["compete", "thor", "single_gate"] if args.part == "all" else [args.part]
    sections: dict[str, list[str]] = {}
    notes: list[str] = []  # a hand-written "## Notes" tail is kept verbatim
    if args.out is not None and args.out.exists():  # keep other parts' sections when re-running one part
        cur, buf = None, []
        for line in args.out.read_text().splitlines():
            if line.startswith("## Notes") or notes:
                notes.append(line)
            elif line.startswith("<!-- part:"):
                cur = line.split(":")[1].split()[0]
                buf = sections.setdefault(cur, [])
                buf.clear()
            elif cur is not None:
                buf.append(line)
    for part in parts:
        t0, c0 = time.perf_counter(), time.process_time()
        if part == "compete":
            lines = part_compete(args.seeds, args.steps)
        elif part == "thor":
            lines = part_thor(args.seeds, args.steps)
        else:
            lines, points = part_single_gate(args.seeds)
            if args.out is not None:
                _plot(points, args.out.with_name("routers_part2_single_gate.png"))
                lines += ["![accuracy vs compute](routers_part2_single_gate.png)", ""]
        cmd = f"`OMP_NUM_THREADS=1 python tools/experiments/routers_part2.py {part} --seeds " \
              f"{' '.join(map(str, args.seeds))}" + (f" --steps {args.steps}`" if part != "single_gate" else "`")
        lines += [f"Command: {cmd} ({time.process_time() - c0:.0f} CPU s, {time.perf_counter() - t0:.0f} s wall on a shared 2-core "
                  "machine, 1 thread).", ""]
        sections[part] = lines
        print("\n".join(lines), flush=True)
    text = ["# Routers part 2: CompeteSMoE, THOR, single-gated MoE", ""]
    for part in ("compete", "thor", "single_gate"):
        if part in sections:
            text += [f"<!-- part:{part} -->", *sections[part]]
    text += notes
    if args.out is not None:
        atomic_write_text(args.out, "\n".join(text).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
