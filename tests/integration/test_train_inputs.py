"""``megamoe train`` on the CPU with inputs that used to pass silently: training that goes
non-finite (train.nonfinite error | skip, torch and DeepSpeed backends) and overrides given
with ``--resume``."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megamoe import cli
from megamoe.testing import run_distributed
from tiny_run import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE_CFG = os.path.join(ROOT, "configs", "tiny_single.yaml")
TINY = ["parallel.backend=torch", "parallel.ep_size=1", *TINY_RUN, "train.plots=false", "train.tensorboard=false",
        "train.eval_interval=0"]
# Adam moves every weight by about lr on the first step: with 1e30 the next forward overflows.
DIVERGE = "train.lr=1e30"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _train(capsys, out, cache_dir, *extra) -> tuple[int, str]:
    rc = cli.main(["train", "--config", SINGLE_CFG, *TINY, f"train.output_dir={out}", f"data.cache_dir={cache_dir}",
                   *extra])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def _summary(out):
    return json.load(open(os.path.join(out, "summary.json")))


def _weights(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_nonfinite_training_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    rc, printed = _train(capsys, out, cache_dir, DIVERGE, "train.steps=6", "train.save_interval=1")
    assert rc == 1, printed
    assert "megamoe train: error: step 2 is non-finite" in printed and "step_00000001" in printed, printed
    assert "Traceback" not in printed
    summary = _summary(out)
    assert summary["status"] == "nonfinite" and summary["failed_step"] == 2 and summary["final_step"] == 1
    assert summary["checkpoint"].endswith("step_00000001") and "step 2 is non-finite" in summary["error"]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000001"]
    assert all(torch.isfinite(t).all() for t in _weights(summary["checkpoint"]).values())
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2] and records[1]["nonfinite"] and not records[0]["nonfinite"]


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    rc, printed = _train(capsys, out, cache_dir, DIVERGE, "train.nonfinite=skip", "train.steps=4",
                         "train.save_interval=1", "train.keep_last=4")
    assert rc == 0, printed
    assert "skipped:     3 non-finite steps" in printed and "step 3 is non-finite" in printed
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["nonfinite_steps_skipped"] == 3
    assert [r.get("skipped") for r in _records(out)] == [None, "nonfinite", "nonfinite", "nonfinite"]
    assert _records(out)[-1]["nonfinite_steps_skipped"] == 3
    # A skipped step leaves the weights as they were: steps 2-4 changed nothing.
    first, last = (_weights(out / "checkpoints" / f"step_0000000{s}") for s in (1, 4))
    assert all(torch.equal(first[k], last[k]) for k in first)


def test_a_skipped_step_leaves_weights_optimizer_and_schedule_alone_and_names_the_layer():
    from megamoe.model import MoETransformerLM
    from megamoe.train.backends import TorchBackend
    from megamoe.train.config import load_config

    cfg = load_config(SINGLE_CFG, TINY)
    torch.manual_seed(0)
    backend = TorchBackend(MoETransformerLM(cfg.model), cfg, device=torch.device("cpu"))
    batch = [torch.randint(0, 256, (4, 32))]
    assert not backend.train_step(batch).nonfinite
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    opt_step = {k: v["step"].clone() for k, v in backend.optimizer.state.items()}
    epoch = backend.scheduler.last_epoch
    hook = backend.model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out * float("nan"))
    result = backend.train_step(batch)
    hook.remove()
    assert result.nonfinite and result.where == "the output of model.layers.1.mlp (in MoE layer 1)", result
    assert all(torch.equal(before[k], v) for k, v in backend.model.state_dict().items())
    assert {k: v["step"] for k, v in backend.optimizer.state.items()} == opt_step
    assert backend.scheduler.last_epoch == epoch
    assert all(p.grad is None for p in backend.model.parameters())
    assert not backend.train_step(batch).nonfinite  # and training goes on


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, cache_dir):
    """An uninterrupted 6-step run with checkpoints at steps 3 and 6."""
    from megamoe.train.config import load_config
    from megamoe.train.trainer import run_training
    out = tmp_path_factory.mktemp("six") / "run"
    cfg = load_config(SINGLE_CFG, TINY + [f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "train.steps=6",
                                          "train.save_interval=3", "train.lr=0.01"])
    run_training(cfg)
    return out


def _from_step3(six_steps, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(six_steps / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    return out


def test_resume_applies_a_new_lr_and_schedule(six_steps, tmp_path, cache_dir, capsys):
    from megamoe.train.backends import lr_lambda
    from megamoe.train.config import LoopConfig

    out = _from_step3(six_steps, tmp_path)
    rc, printed = _train(capsys, out, cache_dir, "train.save_interval=3", "--resume", "train.lr=0.005", "train.steps=8")
    assert rc == 0, printed
    assert "resuming with changed settings: train.steps 6 -> 8, train.lr 0.01 -> 0.005" in printed
    schedule = lr_lambda(LoopConfig(steps=8, warmup_steps=2, lr=0.005))
    got = _records(out)
    assert [r["step"] for r in got] == [4, 5, 6, 7, 8]
    for r in got:  # the lr logged after step s is the one step s+1 uses: lr * schedule(s)
        assert r["lr"] == pytest.approx(0.005 * schedule(r["step"]), rel=1e-9), r["step"]
    assert yaml_lr(out) == 0.005


def yaml_lr(out) -> float:
    import yaml
    return yaml.safe_load(open(out / "config.yaml"))["train"]["lr"]


def test_resume_without_changes_repeats_the_run_exactly(six_steps, tmp_path, cache_dir, capsys):
    out = _from_step3(six_steps, tmp_path)
    rc, printed = _train(capsys, out, cache_dir, "train.steps=6", "train.save_interval=3", "train.lr=0.01", "--resume")
    assert rc == 0, printed
    assert "changed settings" not in printed
    keys = ("loss", "lr", "grad_norm")
    assert [{k: r[k] for k in keys} for r in _records(out)] == [{k: r[k] for k in keys} for r in _records(six_steps)[3:]]


@pytest.mark.parametrize("override, field", [
    ("train.beta1=0.8", "train.beta1=0.8"), ("train.weight_decay=0", "train.weight_decay=0"),
    ("data.seed=7", "data.seed=7"), ("train.precision=bf16", "train.precision='bf16'"),
    ("train.seed=3", "train.seed=3"), ("model.moe.router.aux_loss_coef=0.1", "different model config"),
])
def test_resume_refuses_settings_that_cannot_change(six_steps, tmp_path, cache_dir, capsys, override, field):
    out = _from_step3(six_steps, tmp_path)
    cached = sorted(os.listdir(cache_dir))
    rc, printed = _train(capsys, out, cache_dir, "train.steps=6", "train.save_interval=3", "train.lr=0.01",
                         "--resume", override)
    assert rc == 2, printed
    assert field in printed and ("cannot change on resume" in printed or "different model config" in printed)
    assert not (out / "metrics.jsonl").exists()  # refused before any step
    # ... and before data preparation (data.seed=7 would tokenise a new cache entry) or the model
    assert sorted(os.listdir(cache_dir)) == cached and "model:" not in printed


# ------------------------------------------------------------------ DeepSpeed backend, EP=2, ZeRO-1
# One spawn of 2 gloo processes runs three short jobs through run_training:
# - train.nonfinite=skip with train.lr=1e30: DeepSpeed's ZeRO optimizer drops every later step
#   (its gradient norm is inf), the trainer counts them, the weights stay those of step 1;
# - the same with train.nonfinite=error: both ranks raise NonFiniteError at step 2;
# - fp16 with an initial loss scale of 2^20: the first steps overflow and DeepSpeed skips them
#   while halving the scale, by design; they count as overflow skips, not errors. DeepSpeed's
#   CPU accelerator refuses fp16 on CPUs without fp16 kernels; as in test_ep_fp16.py that one
#   capability check is lifted.
TINY_CFG = os.path.join(ROOT, "configs", "tiny.yaml")
DS_TINY = [o for o in TINY if not o.startswith(("parallel.", "train.micro_batch_size"))] + [
    "parallel.backend=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=1", "parallel.dist_backend=gloo",
    "train.micro_batch_size=2", "train.eval_max_batches=2"]


def _job(out: str, cache: str, extra: list[str]) -> dict:
    from megamoe.finite import NonFiniteError
    from megamoe.train.config import load_config
    from megamoe.train.trainer import run_training

    cfg = load_config(TINY_CFG, DS_TINY + [f"train.output_dir={out}", f"data.cache_dir={cache}", *extra])
    try:
        result = run_training(cfg)
        return {"error": None, "skipped": result.nonfinite_steps_skipped}
    except NonFiniteError as exc:
        return {"error": str(exc), "skipped": None}


def _worker(rank: int, world: int, root: str, cache: str) -> dict:
    from deepspeed.accelerator import get_accelerator

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
def test_deepspeed_nonfinite_skip_error_and_fp16_overflow(tmp_path, cache_dir):
    from megamoe.train.trainer import load_trained_model

    ranks = run_distributed(_worker, 2, str(tmp_path), cache_dir)
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
