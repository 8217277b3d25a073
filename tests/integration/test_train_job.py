"""``megamoe train`` end to end on the CPU: the loss falls, outputs exist, SIGKILL + --resume
repeats an uninterrupted run step for step, and 2-process data parallel matches one process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megamoe.testing import run_distributed
from tiny_run import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE_CFG = os.path.join(ROOT, "configs", "tiny_single.yaml")
TINY_CFG = os.path.join(ROOT, "configs", "tiny.yaml")

TINY = ["parallel.backend=torch", "parallel.ep_size=1", *TINY_RUN, "train.lr=0.01"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def _cmd(out_dir, cache_dir, *extra):
    return [sys.executable, "-m", "megamoe.cli", "train", "--config", SINGLE_CFG, *TINY,
            f"train.output_dir={out_dir}", f"data.cache_dir={cache_dir}", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(out_dir, cache_dir, *extra):
    proc = subprocess.run(_cmd(out_dir, cache_dir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(out_dir, kind):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# One uninterrupted run serves as the output check and as the reference for the resume test.
ARGS = ("train.steps=40", "train.save_interval=4", "train.eval_interval=20", "train.keep_last=2",
        "model.moe.router.jitter_eps=0.1")  # jitter makes the RNG state part of what must survive a resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(out, cache_dir, *ARGS)
    return out, proc.stdout


def test_short_run_learns_and_writes_everything(reference):
    out, stdout = reference
    train = _records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 41))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)  # uniform over 256 pieces is 5.5 nats
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["loss"] < evals[0]["loss"]
    assert evals[1]["ppl"] == pytest.approx(2.718281828 ** evals[1]["loss"], rel=1e-6)
    assert len(train[0]["load"]) == 2 and len(train[0]["load"][0]) == 4
    assert sum(train[0]["load"][0]) == pytest.approx(1.0)
    assert evals[1]["max_vio_global"] >= 0 and len(evals[1]["domain_load"]) >= 3
    # The load statistics of every step: MaxVio, dropped fraction, routing entropy, load percentiles
    # and dead experts, overall and per layer, logged and plotted.
    stats = train[-1]
    assert len(stats["routing_entropy_layers"]) == 2 and 0 < stats["routing_entropy"] <= 1
    assert stats["dropped_fraction"] == 0 and stats["dead_experts"] == sum(stats["dead_experts_layers"]) >= 0
    p10, p50, p90 = stats["load_percentiles_layers"][0]
    assert 0 <= p10 <= p50 <= p90
    for name in ("loss.png", "expert_load.png", "max_vio.png", "expert_domains.png", "load_stats.png"):
        assert os.path.getsize(out / "plots" / name) > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "tb"))
    ckpts = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step_"))
    assert ckpts == ["step_00000036", "step_00000040"]  # keep_last=2 pruned the older ones
    meta = json.load(open(out / "checkpoints" / "step_00000040" / "megamoe_config.json"))
    assert meta["model"]["hidden_size"] == 32 and meta["step"] == 40
    assert {"model.safetensors", "optimizer.pt", "rng_rank0.pt"} <= set(os.listdir(out / "checkpoints" / ckpts[-1]))
    assert str(out / "plots" / "loss.png") in stdout and "checkpoint:" in stdout


def test_an_earlier_run_is_not_silently_mixed_in(reference, cache_dir, capsys, tmp_path):
    import shutil

    from megamoe import cli
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    rc = cli.main(["train", "--config", SINGLE_CFG, *TINY, f"train.output_dir={out}",
                   f"data.cache_dir={cache_dir}"])
    assert rc == 2 and "already holds checkpoints of an earlier run; pass --resume" in capsys.readouterr().err
    # `--resume key=value`: the override is not taken for a checkpoint path. The run is already
    # at its last step, so it only re-evaluates and returns.
    rc = cli.main(["train", "--config", SINGLE_CFG, "--resume", f"train.output_dir={out}",
                   *TINY, f"data.cache_dir={cache_dir}", *ARGS, "train.plots=false", "train.tensorboard=false"])
    printed = capsys.readouterr().out
    assert rc == 0 and "checkpoint:  " + str(out / "checkpoints" / "step_00000040") in printed
    assert f"held-out loss {_records(out, 'eval')[-1]['loss']:.4f}" in printed
    assert _records(out, "eval") == _records(reference[0], "eval")  # nothing logged twice


def test_checkpoint_reloads_to_the_logged_held_out_loss(reference, cache_dir):
    import numpy as np
    import torch

    from megamoe.train.config import load_config
    from megamoe.train.data import cache_key, eval_batches, load_prepared
    from megamoe.train.trainer import load_trained_model

    out, _ = reference
    model = load_trained_model(str(out / "checkpoints" / "step_00000040"))
    cfg = load_config(SINGLE_CFG, TINY + list(ARGS))
    data = load_prepared(os.path.join(cache_dir, cache_key(cfg.data, cfg.model.vocab_size)), seq_len=32,
                         vocab_size=256)
    total = tokens = 0.0
    with torch.no_grad():
        for _, seqs in eval_batches(data.eval_NS, batch_size=4, world=1, max_batches=None):
            x = torch.from_numpy(seqs.astype(np.int64))
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(model(x, labels=x).loss) * n
            tokens += n
    assert total / tokens == pytest.approx(_records(out, "eval")[-1]["loss"], rel=1e-5)


def _sigkill_after_step4_checkpoint(proc, out, *, timeout: float, kill) -> None:
    """Wait until the step-4 checkpoint exists and step 6 is logged, then ``kill()`` (SIGKILL)."""
    deadline = time.time() + timeout
    try:
        while True:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            steps = [r["step"] for r in _records(out, "train")] if (out / "metrics.jsonl").exists() else []
            if os.path.isdir(out / "checkpoints" / "step_00000004") and steps and steps[-1] >= 6:
                break
            time.sleep(0.005)
        kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            kill()
            proc.wait()


@pytest.mark.slow
def test_sigkill_and_resume_repeats_the_uninterrupted_run(tmp_path, cache_dir, reference):
    ref, _ = reference
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, cache_dir, *ARGS), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _sigkill_after_step4_checkpoint(proc, killed, timeout=240, kill=proc.kill)
    assert proc.returncode == -signal.SIGKILL
    logged_before = max(r["step"] for r in _records(killed, "train"))
    _run(killed, cache_dir, *ARGS, "--resume")
    got, want = _records(killed, "train"), _records(ref, "train")
    assert [r["step"] for r in got] == list(range(1, 41))
    keys = ("loss", "aux_loss", "lr", "grad_norm", "max_vio_layers", "load")
    for g, w in zip(got, want):
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, f"step {g['step']} differs"
    assert [(r["step"], r["loss"], r["max_vio_global"]) for r in _records(killed, "eval")] == \
        [(r["step"], r["loss"], r["max_vio_global"]) for r in _records(ref, "eval")]
    assert logged_before > 4  # killed after a checkpoint, with steps past it to redo


def _train_in_process(out_dir, cache_dir, extra=(), resume=None):
    from megamoe.train.config import load_config
    from megamoe.train.trainer import run_training
    cfg = load_config(SINGLE_CFG,
                      TINY + [f"train.output_dir={out_dir}", f"data.cache_dir={cache_dir}", "train.steps=6",
                              "train.micro_batch_size=2", "train.eval_interval=6", "train.save_interval=3",
                              "train.plots=false", "train.tensorboard=false", *extra])
    return run_training(cfg, resume=resume).final_eval


def _ddp_resumed(rank, world, out_dir, cache_dir, ckpt):
    return _train_in_process(out_dir, cache_dir, resume=ckpt)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_data_parallel_resumes_a_one_process_run(tmp_path, cache_dir):
    # Same global batch: 1 rank x micro 2 x accumulation 2 vs 2 ranks x micro 2. The 2-process
    # job resumes the 1-process job's step-3 checkpoint, so steps 4-6 check both the gradient
    # all-reduce and resuming at another world size.
    single = _train_in_process(str(tmp_path / "single"), cache_dir, ["train.grad_accum_steps=2"])
    ckpt = str(tmp_path / "single" / "checkpoints" / "step_00000003")
    evals = run_distributed(_ddp_resumed, 2, str(tmp_path / "ddp"), cache_dir, ckpt)
    assert evals[0] == evals[1]
    got, want = _records(tmp_path / "ddp", "train"), _records(tmp_path / "single", "train")[3:]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 5, 6]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3)
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9)
        assert sum(g["load"], []) == pytest.approx(sum(w["load"], []), abs=1e-6)
    assert evals[0]["loss"] == pytest.approx(single["loss"], rel=1e-4)


# ------------------------------------------------------------------ DeepSpeed backend, EP=2
# The same tiny model under the DeepSpeed backend with expert parallelism 2 on 2 gloo processes,
# started the way launch/quickstart.sh starts it (launch/deepspeed.sh --local-cpu).
DS_TINY = [o for o in TINY if not o.startswith("parallel.")] + [
    "parallel.backend=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=1", "train.plots=false",
    "train.tensorboard=false"]
DS_ARGS = ("train.steps=12", "train.save_interval=4", "train.eval_interval=12", "train.keep_last=3",
           "model.moe.router.jitter_eps=0.1")


def _ds_cmd(out_dir, cache_dir, *extra, flags=()):
    from megamoe.parallel import free_port
    return ["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), "--local-cpu", "--nproc", "2", "--master-port",
            str(free_port()), *flags, TINY_CFG, *DS_TINY, f"train.output_dir={out_dir}",
            f"data.cache_dir={cache_dir}", *DS_ARGS, *extra]


def _ds_env():
    return dict(_env(), MEGAMOE_PYTHON=sys.executable)


def _ds_run(out_dir, cache_dir, *extra, flags=()):
    proc = subprocess.run(_ds_cmd(out_dir, cache_dir, *extra, flags=flags), cwd=ROOT, env=_ds_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("ds-reference") / "run"
    _ds_run(out, cache_dir)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_ep2_sigkill_and_resume_repeats_the_uninterrupted_run(tmp_path, cache_dir, ds_reference):
    killed = tmp_path / "killed"
    # A session of its own, so the whole launcher tree (runner and both ranks) dies at once.
    proc = subprocess.Popen(_ds_cmd(killed, cache_dir), cwd=ROOT, env=_ds_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _sigkill_after_step4_checkpoint(proc, killed, timeout=300,
                                    kill=lambda: os.killpg(proc.pid, signal.SIGKILL))
    logged_before = max(r["step"] for r in _records(killed, "train"))
    assert 4 < logged_before < 12  # killed after a checkpoint, with steps past it to redo
    _ds_run(killed, cache_dir, flags=("--resume",))
    got, want = _records(killed, "train"), _records(ds_reference, "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))
    keys = ("loss", "aux_loss", "lr", "grad_norm", "max_vio_layers", "load")
    for g, w in zip(got, want):
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, f"step {g['step']} differs"
    assert [(r["step"], r["loss"]) for r in _records(killed, "eval")] == \
        [(r["step"], r["loss"]) for r in _records(ds_reference, "eval")]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_ep2_checkpoint_resumes_at_ep1(tmp_path, cache_dir, ds_reference):
    import shutil

    # The EP=2 run's step-4 checkpoint, alone in a fresh output_dir, resumed with EP=1: experts
    # and Adam state are resharded, so steps 5-12 repeat the EP=2 run up to reduction order.
    resumed = tmp_path / "ep1"
    shutil.copytree(ds_reference / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    _ds_run(resumed, cache_dir, "parallel.ep_size=1", flags=("--resume",))
    got, want = _records(resumed, "train"), _records(ds_reference, "train")[4:]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(5, 13))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), f"step {g['step']}"
        assert g["aux_loss"] == pytest.approx(w["aux_loss"], rel=1e-4, abs=1e-7), f"step {g['step']}"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), f"step {g['step']}"
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9)
        assert sum(g["load"], []) == pytest.approx(sum(w["load"], []), abs=1e-6)
    assert _records(resumed, "eval")[-1]["loss"] == pytest.approx(_records(ds_reference, "eval")[-1]["loss"],
                                                                  rel=1e-5)
    meta = json.load(open(resumed / "checkpoints" / "step_00000012" / "megamoe_config.json"))
    assert meta["ep_size"] == 1


# ------------------------------------------------------------------ ALF-LB in the train job
def _biases(step_dir):
    """Each MoE layer's ALF-LB bias in a torch-backend checkpoint."""
    from safetensors.torch import load_file
    return {k: v for k, v in load_file(str(step_dir / "model.safetensors")).items() if k.endswith("expert_bias")}


@pytest.mark.slow
def test_alflb_run_resumes_like_an_uninterrupted_one(tmp_path, cache_dir):
    """``megamoe train`` with a ``balancing`` section (the torch backend): the biases move every
    step, and a run stopped at step 3 and resumed to 6 repeats the straight 6-step run (losses,
    biases, the balancer's update count)."""
    # (with the config's aux loss kept: a balancer built on routers with an aux loss once left
    # every router but the first without a bias, and the first update crashed)
    alflb = ("balancing.step_size=0.001", "train.save_interval=3",
             "train.eval_interval=0", "train.plots=false", "train.tensorboard=false")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run(straight, cache_dir, *alflb, "train.steps=6")
    _run(stopped, cache_dir, *alflb, "train.steps=3")
    _run(stopped, cache_dir, *alflb, "train.steps=6", "--resume")
    got, want = _records(stopped, "train"), _records(straight, "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for g, w in zip(got, want):
        assert g["loss"] == w["loss"] and g["load"] == w["load"], f"step {g['step']} differs"
        assert g["balancer_alflb/step_size"] == 0.001 and g["balancer_alflb/bias_abs_max"] > 0
    end = [d / "checkpoints" / "step_00000006" for d in (stopped, straight)]
    biases = [_biases(d) for d in end]
    assert len(biases[0]) == 2 and all(bool(b.abs().max() > 0) for b in biases[0].values())
    assert all(torch.equal(biases[0][k], biases[1][k]) for k in biases[1])
    for d in end:
        assert json.load(open(d / "megamoe_config.json"))["step_state"]["balancer"]["num_updates"] == 6


@pytest.mark.slow
def test_alflb_defaults_with_the_deepspeed_backend_and_resume(tmp_path, cache_dir):
    """``balancing={}`` (ALF-LB with its defaults) through the DeepSpeed backend in one process,
    stopped at step 2 and resumed to 3: every step updates the biases once."""
    ds = ("parallel.backend=deepspeed", "parallel.ep_size=1", "balancing={}", "train.save_interval=2",
          "train.eval_interval=0", "train.plots=false", "train.tensorboard=false")
    out = tmp_path / "ds"
    _run(out, cache_dir, *ds, "train.steps=2")
    _run(out, cache_dir, *ds, "train.steps=3", "--resume")
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["balancer_alflb/step_size"] == 0.001 for r in train)
    meta = json.load(open(out / "checkpoints" / "step_00000003" / "megamoe_config.json"))
    assert meta["step_state"]["balancer"]["num_updates"] == 3 and meta["train_config"]["balancing"]["update"] == "sign"


# ------------------------------------------------------------------ checkpoints of the older config layout
def _old_layout(model: dict) -> dict:
    """A model section as megamoe wrote it before ``model.moe`` and typed router options: the MoE
    fields at the model level, the top-k options beside ``router.top_k``."""
    old = {k: v for k, v in model.items() if k != "moe"}
    moe = dict(model["moe"])
    moe.pop("hidden_size", None)
    router = dict(moe.pop("router"))
    router.update(router.pop("options"))
    return {**old, **moe, "router": router}


def test_a_checkpoint_in_the_older_config_layout_resumes_converts_and_loads(tmp_path, cache_dir):
    """A run's checkpoint whose megamoe_config.json holds the model (and train_config) in the layout
    megamoe wrote before, resealed: ``--resume`` continues it and ``megamoe convert`` reads it, each
    with one ConfigLayoutWarning saying what moved; load_trained_model reads it too."""
    from megamoe.checkpoint.integrity import write_manifest
    from megamoe.config import ConfigLayoutWarning
    from megamoe.train.trainer import load_trained_model

    out = tmp_path / "run"
    common = ("train.save_interval=2", "train.eval_interval=0", "train.plots=false", "train.tensorboard=false")
    _run(out, cache_dir, *common, "train.steps=2")
    step = out / "checkpoints" / "step_00000002"
    meta = json.load(open(step / "megamoe_config.json"))
    meta["model"] = _old_layout(meta["model"])
    meta["train_config"]["model"] = _old_layout(meta["train_config"]["model"])
    meta["train_config"]["balancing"] = None
    del meta["step_state"], meta["train_config"]["train"]["dead_expert_window"]
    assert "num_experts" in meta["model"] and "score_func" in meta["model"]["router"]
    (step / "megamoe_config.json").write_text(json.dumps(meta, indent=1))
    write_manifest(step)  # sealed as the older megamoe sealed it
    with pytest.warns(ConfigLayoutWarning, match=r"model\.num_experts -> model\.moe\.num_experts"):
        model = load_trained_model(str(step))
    assert model.config.moe.num_experts == 4
    convert = subprocess.run([sys.executable, "-m", "megamoe.cli", "convert", str(step), str(tmp_path / "hf")],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert convert.stderr.count("ConfigLayoutWarning") == 1, convert.stderr[-3000:]
    assert "model.router.score_func -> model.moe.router.options.score_func" in convert.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    proc = _run(out, cache_dir, *common, "train.steps=3", "--resume")
    assert proc.stderr.count("ConfigLayoutWarning") == 1, proc.stderr[-3000:]
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    new_meta = json.load(open(out / "checkpoints" / "step_00000003" / "megamoe_config.json"))
    assert new_meta["model"]["moe"]["num_experts"] == 4  # the next checkpoint is written in the new layout
