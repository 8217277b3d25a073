"""Benchmark: router cost (and the balanced router's assignment solve) against one layer step.

For each router it times, on the same MoE layer shape, (a) the router's forward alone and
(b) one full training step of the layer: forward, loss, backward (for ``skip``/``balanced``
through ``estimator_loss``). For ``balanced`` it also reports the time inside
``scipy.optimize.linear_sum_assignment``, for Expert Choice with a cap the time of the capped
assignment (projections + integral HiGHS solve), with its projection sweeps and the fraction of
tokens over the cap in the notes; ``score_sum`` is the objective sum of S over the chosen
(token, expert) pairs (uncapped Expert Choice is its upper bound). Medians over ``--reps`` after one warm-up.

    PYTHONPATH=$PWD python tools/bench/bench_routers.py --tokens 512 2048 --out tools/results/bench_routers.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.atomic import atomic_write_text
from megamoe.train.objectives import estimator_loss

ROUTERS = [
    ("topk k=2 dropless", dict(name="topk", top_k=2)),
    ("topk k=1 c=1.25", dict(name="topk", top_k=1, options={"capacity_factor": 1.25})),
    ("expert_choice c=2", dict(name="expert_choice", options={"capacity_factor": 2.0})),
    ("expert_choice c=2 cap b=2 exact", dict(name="expert_choice",
                                             options={"capacity_factor": 2.0, "max_experts_per_token": 2})),
    ("expert_choice c=2 cap b=2 dykstra", dict(name="expert_choice", options={
        "capacity_factor": 2.0, "max_experts_per_token": 2, "lp_solver": "dykstra"})),
    ("skip c=1.25", dict(name="skip", top_k=1, options={"capacity_factor": 1.25})),
    ("balanced (whole batch)", dict(name="balanced", top_k=1, options={"group_size": None})),
    ("balanced group 256", dict(name="balanced", top_k=1, options={"group_size": 256})),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(router_kw: dict, *, tokens: int, hidden: int, inter: int, experts: int, reps: int,
              device: torch.device) -> dict[str, float]:
    cfg = MoEConfig(hidden_size=hidden, num_experts=experts, experts=ExpertConfig(intermediate_size=inter),
                    router=RouterConfig(aux_loss_coef=0.0, **router_kw))
    layer = MoELayer(cfg).to(device).train()
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    estimator = router_kw["name"] in ("skip", "balanced")
    solve: list[float] = []
    notes: dict[str, float] = {}

    def route():
        with torch.no_grad():
            d = layer.router(x, layer.routing_context())
        for key in ("assignment_seconds", "lp_seconds"):
            if key in d.stats:
                solve.append(float(d.stats[key]))
        for key in ("over_cap_fraction", "lp_iterations", "lp_violation"):
            if key in d.stats:
                notes[key] = float(d.stats[key])
        if router_kw["name"] == "expert_choice":  # sum of S over chosen pairs: the LP objective
            notes["score_sum"] = float(d.weights_TK.sum())

    def step():
        out = layer(x)
        token_loss = out.float().square().mean(-1)
        loss = estimator_loss(layer, token_loss) if estimator else token_loss.mean()
        loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    route_s = timed(route, reps, device)
    step_s = timed(step, reps, device)
    return {"route_ms": 1e3 * route_s, "step_ms": 1e3 * step_s,
            "solve_ms": 1e3 * statistics.median(solve) if solve else float("nan"), "notes": notes}


def lp_convergence(tokens: int, hidden: int, experts: int, entropies: list[float], max_iterations: int,
                   tolerance: float) -> list[str]:
    """Sweeps (and seconds) the Dykstra projections need to reach ``tolerance`` (c=2, b=2)."""
    import math

    from megamoe.routing.expert_choice import capped_assignment_lp
    scores = torch.softmax(torch.randn(tokens, hidden) @ (torch.randn(hidden, experts) / hidden ** 0.5), dim=-1)
    cap = math.ceil(tokens * 2 / experts)
    lines = ["", f"Dykstra projections, T={tokens}, E={experts}, c=2, b=2, tolerance {tolerance:g} "
             f"(at most {max_iterations} sweeps):", "",
             "| lp_entropy | sweeps | final relative violation | seconds |", "|---:|---:|---:|---:|"]
    for lam in entropies:
        info: dict = {}
        t0 = time.perf_counter()
        capped_assignment_lp(scores, capacity=cap, max_per_token=2, entropy=lam, iterations=max_iterations,
                             tolerance=tolerance, info=info)
        lines.append(f"| {lam:g} | {info['iterations']} | {info['violation']:.2g} | {time.perf_counter() - t0:.2f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the markdown table here (atomically)")
    p.add_argument("--lp-convergence", type=float, nargs="*", default=[1e-3, 1e-2, 1e-1], metavar="LAMBDA",
                   help="also report the sweeps Expert Choice's Dykstra projections need at these lp_entropy "
                        "values (first --tokens value; none to skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    lines = [f"Layer: D={args.hidden}, I={args.inter} (swiglu), E={args.experts}, fp32, {where}; "
             f"median of {args.reps}.", "",
             "| router | tokens | router fwd (ms) | assignment solve (ms) | layer train step (ms) | solve / step "
             "| notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for tokens in args.tokens:
        for label, kw in ROUTERS:
            r = bench_one(kw, tokens=tokens, hidden=args.hidden, inter=args.inter, experts=args.experts,
                          reps=args.reps, device=device)
            ratio = r["solve_ms"] / r["step_ms"]
            solve = "-" if r["solve_ms"] != r["solve_ms"] else f"{r['solve_ms']:.1f}"
            share = "-" if ratio != ratio else f"{ratio:.0%}"
            notes = ", ".join(f"{k} {v:.3g}" for k, v in r["notes"].items()) or "-"
            lines.append(f"| {label} | {tokens} | {r['route_ms']:.1f} | {solve} | {r['step_ms']:.1f} | {share} "
                         f"| {notes} |")
            print(lines[-1], flush=True)
    if args.lp_convergence:
        lines += lp_convergence(args.tokens[0], args.hidden, args.experts, args.lp_convergence, 3000, 1e-3)
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
