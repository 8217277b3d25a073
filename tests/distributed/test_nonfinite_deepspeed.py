"""The non-finite guard under the DeepSpeed backend: EP=2, ZeRO-1, 2 gloo processes.

One spawn runs three short jobs of the tiny model through ``run_training``:
- ``train.nonfinite=skip`` with ``train.lr=1e30`` (Adam's first step makes the next forwards
  overflow): DeepSpeed's ZeRO optimizer drops every later step (its gradient norm is inf), the
  trainer counts them, the weights stay those of step 1, and the run completes;
- the same with ``train.nonfinite=error``: both ranks raise NonFiniteError at step 2 and the
  summary records it;
- fp16 with an initial loss scale of 2^20: the first steps overflow and DeepSpeed skips them
  while halving the scale, by design; they are counted as overflow skips, not errors, and the
  run completes with ``train.nonfinite=error``. DeepSpeed's CPU accelerator refuses fp16 on
  CPUs without fp16 kernels; as in test_ep_fp16.py that one capability check is lifted.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megamoe.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CFG = os.path.join(ROOT, "configs", "tiny.yaml")
TINY = ["parallel.backend=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=1", "parallel.dist_backend=gloo",
        "model.vocab_size=256", "model.hidden_size=32", "model.num_heads=2", "model.max_seq_len=32",
        "model.num_experts=4", "model.experts.intermediate_size=32", "data.embedded_docs=420", "data.seq_len=32",
        "data.eval_fraction=0.1", "train.micro_batch_size=2", "train.warmup_steps=2", "train.progress=false",
        "train.plots=false", "train.tensorboard=false", "train.eval_interval=0", "train.eval_max_batches=2",
        "train.threads=1"]


def _job(out: str, cache: str, extra: list[str]) -> dict:
    from megamoe.finite import NonFiniteError
    from megamoe.train.config import load_config
    from megamoe.train.trainer import run_training

    cfg = load_config(TINY_CFG, TINY + [f"train.output_dir={out}", f"data.cache_dir={cache}", *extra])
    try:
        result = run_training(cfg)
        return {"error": None, "skipped": result.nonfinite_steps_skipped}
    except NonFiniteError as exc:
        return {"error": str(exc), "skipped": None}


def _worker(rank: int, world: int, root: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    cache = os.path.join(root, "cache")
    out = {"skip": _job(os.path.join(root, "skip"), cache, ["train.lr=1e30", "train.nonfinite=skip",
                                                            "train.steps=4", "train.save_interval=1",
                                                            "train.keep_last=4"]),
           "error": _job(os.path.join(root, "error"), cache, ["train.lr=1e30", "train.steps=4",
                                                              "train.save_interval=1"])}
    accelerator = get_accelerator()
    lifted = not accelerator.is_fp16_supported()
    if lifted:
        accelerator.is_fp16_supported = lambda: True
    try:
        out["fp16"] = _job(os.path.join(root, "fp16"), cache, [
            "train.precision=fp16", "train.steps=4", "train.lr=0.01",
            'deepspeed={"fp16": {"initial_scale_power": 20, "hysteresis": 1, "loss_scale_window": 1000}}'])
    finally:
        if lifted:
            del accelerator.is_fp16_supported
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_nonfinite_skip_error_and_fp16_overflow(tmp_path):
    from megamoe.train.trainer import load_trained_model

    ranks = run_distributed(_worker, 2, str(tmp_path))
    assert ranks[0] == ranks[1]  # every rank takes the same decision at the same step
    res = ranks[0]

    assert res["skip"] == {"error": None, "skipped": 3}
    summary = json.load(open(tmp_path / "skip" / "summary.json"))
    assert summary["status"] == "completed" and summary["nonfinite_steps_skipped"] == 3
    first = load_trained_model(str(tmp_path / "skip" / "checkpoints" / "step_00000001")).state_dict()
    last = load_trained_model(str(tmp_path / "skip" / "checkpoints" / "step_00000004")).state_dict()
    assert all(torch.equal(first[k], last[k]) for k in first)  # DeepSpeed dropped steps 2-4

    assert res["error"]["error"].startswith("step 2 is non-finite"), res["error"]
    summary = json.load(open(tmp_path / "error" / "summary.json"))
    assert summary["status"] == "nonfinite" and summary["failed_step"] == 2
    assert summary["checkpoint"].endswith("step_00000001")

    assert res["fp16"] == {"error": None, "skipped": 0}
    summary = json.load(open(tmp_path / "fp16" / "summary.json"))
    assert summary["status"] == "completed" and summary["overflow_steps_skipped"] >= 1
    assert summary["nonfinite_steps_skipped"] == 0
