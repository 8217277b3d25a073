#!/usr/bin/env python
"""The summary table of tools/gpu_check.sh: the steps' status, the layer benchmark (from the
JSON tools/bench/bench_layer.py wrote), megamoe against its GPU targets, and the short training
run's losses. Prints Markdown; gpu_check.sh writes it to $OUT/summary.md.

    python tools/bench/gpu_check_summary.py OUT DEVICE [NAME|STATUS|SECONDS ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the check's output folder (bench_layer_DEVICE.json, train/metrics.jsonl)")
    p.add_argument("device", help="cpu or cuda: which benchmark JSON to read")
    p.add_argument("steps", nargs="*", help="one NAME|STATUS|SECONDS per step, in order")
    args = p.parse_args(argv)
    summarize(args.out, args.device, args.steps)
    return 0


def summarize(out: str, device: str, steps: list[str]) -> None:
    print(f"\n## megamoe gpu_check ({device})\n")
    print("| step | status | seconds |\n|---|---|---:|")
    for s in steps:
        name, status, secs = s.split("|")
        print(f"| {name} | {status} | {secs} |")
    bench = os.path.join(out, f"bench_layer_{device}.json")
    if os.path.exists(bench):
        rep = json.load(open(bench))
        gemm = rep.get("gemm")
        print(f"\nLayer fwd+bwd, {rep['dtype']}, median of {rep['repeats']}: ms (TFLOP/s"
              + (f", % of the {gemm['n']}^3 GEMM's {gemm['tflops']:.0f} TFLOP/s" if gemm else "") + "), peak MB\n")
        impls = []
        for sh in rep["shapes"].values():
            impls += [r["impl"] for r in sh["results"] if r["impl"] not in impls]
        print("| shape | " + " | ".join(impls) + " |\n|---|" + "---|" * len(impls))
        for name, sh in rep["shapes"].items():
            cells = []
            by = {r["impl"]: r for r in sh["results"]}
            for i in impls:
                r = by.get(i)
                if r is None:
                    cells.append("")
                elif not r["ok"]:
                    cells.append("skipped" if r["error"].startswith("skipped") else "error")
                else:
                    share = f", {100 * r['share_of_gemm']:.0f}%" if not math.isnan(r["share_of_gemm"]) else ""
                    cells.append(f"{r['ms']:.2f} ({r['tflops']:.0f}{share}), {r['peak_mb']:.0f}")
            d = sh["dims"]
            print(f"| {name} T={d['T']} H={d['H']} I={d['I']} E={d['E']} K={d['K']} | " + " | ".join(cells) + " |")
        checks = [(name, c) for name, sh in rep["shapes"].items() for c in sh.get("targets", [])]
        if checks:
            met = sum(c["met"] for _, c in checks)
            print(f"\nTargets (tools/bench/bench_layer.py): {met} of {len(checks)} met\n")
            print("| shape | check | megamoe | target | met |\n|---|---|---:|---|---|")
            for name, c in checks:
                value = f"{100 * c['value']:.1f}%" if c["check"].startswith("share") else f"{c['value']:.2f}"
                print(f"| {name} | {c['check']} | {value} | {c['target']} | {'yes' if c['met'] else 'NO'} |")
    metrics = os.path.join(out, "train", "metrics.jsonl")
    if os.path.exists(metrics):
        records, unreadable = [], 0
        for line in open(metrics):
            try:
                records.append(json.loads(line))
            except ValueError:  # e.g. the last line of a run stopped by its timeout mid-write
                unreadable += 1
        if unreadable:
            print(f"\n{metrics}: {unreadable} unreadable line(s) skipped")
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        if train:
            tps = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
            print(f"\ntrain: {len(train)} steps, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
                  f"median {tps:.0f} tokens/s" + (f"; held-out loss {evals[-1]['loss']:.3f}" if evals else ""))


if __name__ == "__main__":
    raise SystemExit(main())
