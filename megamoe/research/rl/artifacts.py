"""Run outputs of ``megamoe rl``, each written atomically (temp file in the same dir, then os.replace).

- ``atomic_write_text(path, text)``, ``atomic_torch_save(obj, path)``: crash-safe writes.
- ``write_jsonl(path, rows)``: the per-episode log, rewritten whole so readers never see half a line.
- ``plot_returns(path, records, title=)``: matplotlib PNG of return vs environment steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


from megamoe.atomic import atomic_torch_save, atomic_write, atomic_write_text  # noqa: F401  (re-exported)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_returns(path: str | os.PathLike, records: Sequence[Any], *, title: str) -> Path:
    """Training-episode returns (and deterministic eval returns, if any) against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.kind == "train"]
    evals = [r for r in records if r.kind == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot([r.step for r in train], [r.ret for r in train], ".-", lw=0.8, ms=3, alpha=0.8,
                label="training episode return")
    if evals:
        ax.plot([r.step for r in evals], [r.ret for r in evals], "o-", lw=1.5, label="eval return (deterministic)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
