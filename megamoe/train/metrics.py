"""Training metrics: a JSONL log, TensorBoard scalars, and the plots drawn at the end of a run.

Shape legend: L MoE layers, E experts, D held-out domains.

Each line of ``metrics.jsonl`` is one record: ``{"kind": "train", "step", "loss", "aux_loss",
"lr", "grad_norm", "max_vio", "max_vio_layers" [L], "load" [L][E] (share of routed slots per
expert), "dropped_fraction" (+ "_layers" [L]), "routing_entropy" (+ "_layers" [L]),
"load_percentiles_layers" [L][3] (10/50/90% of load / mean load), "dead_experts" (+ "_layers"
[L]; see megamoe.stats for each definition), "balancer_alflb/..." (with a ``balancing``
section), "tokens", "tokens_per_s", "time", "nonfinite" (the step's loss or gradient norm was
NaN/inf), and on a step that was not applied "skipped" ("nonfinite" or "overflow") with the
running counts "nonfinite_steps_skipped", "overflow_steps_skipped"}`` or ``{"kind": "eval",
"step", "loss", "ppl", "max_vio_global", "max_vio_global_layers" [L], "domain_loss" {domain:
loss}, "domain_load" {domain: [L][E]}}``. On resume, records after the checkpoint's step are
dropped (atomically) so the file reads as one uninterrupted run. TensorBoard gets every scalar
and, per layer, the ``*_layers`` lists (``train/max_vio_layer0`` ...) and the percentiles.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import numpy as np


from megamoe.atomic import atomic_savefig, atomic_write_text  # noqa: F401  (atomic_write_text re-exported)
from megamoe.stats import PERCENTILES

PERCENTILE_NAMES = [f"p{round(q * 100)}" for q in PERCENTILES]


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a torn last line (a killed writer) is ignored."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: str, *, after_step: int) -> None:
    """Keep only records with step <= ``after_step`` (rewrites the file atomically)."""
    if not os.path.isfile(path):
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= after_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricsLogger:
    """Appends JSONL records and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str, *, start_step: int, tensorboard: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        truncate_metrics(self.path, after_step=start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a killed run wrote after the checkpoint we resume from.
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind, step = record["kind"], record["step"]
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            for key, values in record.items():
                if key.endswith("_layers") and isinstance(values, list):
                    for i, v in enumerate(values):
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            self._tb.add_scalar(f"{kind}/{key[:-len('_layers')]}_layer{i}", v, step)
            for i, qs in enumerate(record.get("load_percentiles_layers", [])):
                for q, v in zip(PERCENTILE_NAMES, qs):
                    self._tb.add_scalar(f"{kind}/load_{q}_layer{i}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _ema(values: Iterable[float], alpha: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def write_plots(metrics_path: str, out_dir: str) -> list[str]:
    """Draw loss.png, expert_load.png, max_vio.png, load_stats.png (and expert_domains.png when
    the held-out set has domains) from a metrics file; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        atomic_savefig(fig, path, dpi=80)
        plt.close(fig)
        written.append(path)

    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in train], alpha=0.3, color="C0", label="train (per step)")
    ax.plot(steps, _ema(r["loss"] for r in train), color="C0", label="train (EMA 0.9)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", color="C3", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    loads = [np.asarray(r["load"], dtype=float) for r in train if r.get("load")]
    if loads and all(x.shape == loads[0].shape for x in loads):
        load_SLE = np.stack(loads)
        num_layers = load_SLE.shape[1]
        fig, axes = plt.subplots(num_layers, 1, figsize=(7, 1.2 + 1.6 * num_layers), squeeze=False)
        for i in range(num_layers):
            ax = axes[i, 0]
            im = ax.imshow(load_SLE[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load_SLE.shape[2] - 0.5),
                           interpolation="nearest")
            ax.set_ylabel(f"layer {i}\nexpert")
            fig.colorbar(im, ax=ax, label="share of slots")
        axes[-1, 0].set_xlabel("optimizer step")
        fig.suptitle("per-layer expert load over steps")
        fig.tight_layout()
        save(fig, "expert_load.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    vio = np.asarray([r["max_vio_layers"] for r in train], dtype=float)
    for i in range(vio.shape[1] if vio.ndim == 2 else 0):
        ax.plot(steps, _ema(vio[:, i]), lw=1, alpha=0.7, label=f"layer {i} (EMA)")
    ax.plot(steps, _ema(r["max_vio"] for r in train), color="k", lw=2, label="mean over layers (EMA)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["max_vio_global"] for r in evals], "s", color="C3", ms=7,
                label="held-out MaxVio_global")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio = (max load - mean) / mean")
    ax.set_title("load imbalance")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "max_vio.png")

    with_stats = [r for r in train if r.get("routing_entropy_layers")]
    if with_stats:
        _plot_load_stats(with_stats, save, plt)

    last = evals[-1] if evals else None
    if last and last.get("domain_load") and len(last["domain_load"]) > 1:
        domains = sorted(last["domain_load"])
        load_DLE = np.asarray([last["domain_load"][d] for d in domains], dtype=float)
        num_layers = load_DLE.shape[1]
        fig, axes = plt.subplots(1, num_layers, figsize=(3.2 * num_layers + 1.5, 0.45 * len(domains) + 1.6),
                                 squeeze=False)
        for i in range(num_layers):
            ax = axes[0, i]
            im = ax.imshow(load_DLE[:, i, :], aspect="auto", cmap="magma", vmin=0)
            ax.set_yticks(range(len(domains)), domains if i == 0 else [""] * len(domains))
            ax.set_xlabel("expert")
            ax.set_title(f"layer {i}")
            fig.colorbar(im, ax=ax, fraction=0.05)
        fig.suptitle(f"held-out expert load per domain (step {last['step']})")
        fig.tight_layout()
        save(fig, "expert_domains.png")
    return written


def _plot_load_stats(train: list[dict[str, Any]], save: Any, plt: Any) -> None:
    """load_stats.png: per layer over steps, the load percentiles (a band from p10 to p90 around
    the median, relative to the mean load), the routing entropy, the dropped fraction and the
    dead experts."""
    steps = [r["step"] for r in train]
    num_layers = len(train[0]["routing_entropy_layers"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), squeeze=False)
    ax = axes[0, 0]
    for i in range(num_layers):
        q = np.asarray([r["load_percentiles_layers"][i] for r in train], dtype=float)
        line, = ax.plot(steps, q[:, 1], lw=1, label=f"layer {i} median")
        ax.fill_between(steps, q[:, 0], q[:, 2], color=line.get_color(), alpha=0.2)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_title("load / mean load: p10, median, p90")
    panels = ((axes[0, 1], "routing_entropy_layers", "routing entropy (1 = uniform load)"),
              (axes[1, 0], "dropped_fraction_layers", "dropped fraction of selected slots"),
              (axes[1, 1], "dead_experts_layers", "dead experts (no slot over the window)"))
    for ax, key, title in panels:
        values = np.asarray([r.get(key) or [0] * num_layers for r in train], dtype=float)
        for i in range(num_layers):
            ax.plot(steps, values[:, i], lw=1, label=f"layer {i}")
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("per-layer load statistics")
    fig.tight_layout()
    save(fig, "load_stats.png")
