"""Summarise a finished ``megamoe train`` run as a markdown table and copy its plots.

    python tools/experiments/train_report.py runs/tiny --out tools/results/train --command "..."

Writes ``<out>.md`` (loss at a few steps, held-out loss / ppl / MaxVio_global at each eval,
throughput, wall time, held-out loss and dominant expert per domain) and ``<out>_<plot>.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megamoe.train.metrics import atomic_write_text, read_metrics  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output prefix, e.g. tools/results/train")
    p.add_argument("--command", default="", help="the command that produced the run (recorded in the table)")
    args = p.parse_args()
    records = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    summary = json.load(open(os.path.join(args.run_dir, "summary.json")))
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        raise SystemExit(f"{args.run_dir}: no training records")
    lines = [f"# megamoe train: {os.path.basename(os.path.abspath(args.run_dir))}", ""]
    if args.command:
        lines += ["Command:", "", "```bash", args.command, "```", ""]
    n = len(train)
    picks = sorted({0, min(n - 1, 9), n // 4, n // 2, 3 * n // 4, n - 1})
    lines += ["| step | train loss (mean of 10 steps to here) | MaxVio (batch, mean of layers) | tokens/s |",
              "|---:|---:|---:|---:|"]
    for i in picks:
        window = train[max(0, i - 9):i + 1]
        lines.append(f"| {train[i]['step']} | {np.mean([r['loss'] for r in window]):.3f} | "
                     f"{np.mean([r['max_vio'] for r in window]):.3f} | "
                     f"{np.median([r['tokens_per_s'] for r in window]):.0f} |")
    lines += ["", "| eval step | held-out loss | ppl | MaxVio_global (mean of layers) |", "|---:|---:|---:|---:|"]
    for r in evals:
        lines.append(f"| {r['step']} | {r['loss']:.3f} | {r['ppl']:.1f} | {r['max_vio_global']:.3f} |")
    if evals and evals[-1].get("domain_load"):
        last = evals[-1]
        lines += ["", f"Held-out split per domain at step {last['step']} (share of the layer's routed slots "
                  "taken by its most-used expert; uniform would be 1/E):", "",
                  "| domain | loss | layer 0: top expert (share) | last layer: top expert (share) |",
                  "|---|---:|---:|---:|"]
        for d in sorted(last["domain_load"]):
            load = np.asarray(last["domain_load"][d])
            first, final = load[0], load[-1]
            lines.append(f"| {d} | {last['domain_loss'][d]:.3f} | {first.argmax()} ({first.max():.2f}) | "
                         f"{final.argmax()} ({final.max():.2f}) |")
    lines += ["", f"Wall time {summary['wall_s']:.0f} s for {summary['final_step']} steps; parameters "
              f"{summary['parameters']['total']:,} ({summary['parameters']['active']:,} active per token)."]
    copied = []
    for path in summary.get("plots", []):
        dest = f"{args.out}_{os.path.basename(path)}"
        shutil.copyfile(path, dest)
        copied.append(os.path.basename(dest))
    if copied:
        lines += ["", "Plots: " + ", ".join(f"`{c}`" for c in copied)]
    atomic_write_text(args.out + ".md", "\n".join(lines) + "\n")
    print(f"wrote {args.out}.md and {len(copied)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
