"""Checkpoint integrity under the DeepSpeed backend: EP=2, ZeRO-1, 2 gloo processes started
by ``launch/deepspeed.sh --local-cpu``. Kept lean: two runs of two processes.

- Every file of a DeepSpeed training checkpoint (both ranks' DeepSpeed files, megamoe's
  expert shards, optimizer state, RNG states, manifests) truncated, changed or deleted:
  verification and ``load_trained_model`` name the file (one process, no engine needed).
- ``--resume`` with a damaged expert shard of rank 1 in the newest checkpoint skips it and
  resumes from the one before; a kill of rank 0 while it swaps the re-saved step in (old copy
  moved aside) loses nothing: the next ``--resume`` recovers the sealed copy and the run
  finishes with the uninterrupted run's losses.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.checkpoint.integrity import MANIFEST_NAME, CheckpointError
from megamoe.checkpoint.staged import CRASH_ENV

ROOT = Path(__file__).resolve().parents[2]
TINY = ["parallel.backend=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=1", "model.vocab_size=256",
        "model.hidden_size=32", "model.num_heads=2", "model.max_seq_len=32", "model.moe.num_experts=4",
        "model.moe.experts.intermediate_size=32", "data.embedded_docs=420", "data.seq_len=32", "data.eval_fraction=0.1",
        "train.micro_batch_size=2", "train.warmup_steps=2", "train.lr=0.01", "train.threads=1",
        "train.progress=false", "train.plots=false", "train.tensorboard=false", "train.steps=4",
        "train.save_interval=2", "train.eval_interval=0", "train.keep_last=3", "model.moe.router.jitter_eps=0.1"]
KEYS = ("loss", "aux_loss", "lr", "grad_norm", "max_vio_layers", "load")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _launch(out: Path, cache: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    from megamoe.parallel import free_port
    cmd = ["bash", str(ROOT / "launch" / "deepspeed.sh"), "--local-cpu", "--nproc", "2", "--master-port",
           str(free_port()), *flags, str(ROOT / "configs" / "tiny.yaml"), *TINY, f"train.output_dir={out}",
           f"data.cache_dir={cache}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGAMOE_PYTHON": sys.executable, **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    full_env.pop("RANK", None)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", *KEYS)} for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ds-cache")
    out = tmp_path_factory.mktemp("ds-ref") / "run"
    proc = _launch(out, cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, cache


def _files(step: Path) -> list[str]:
    return sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        b = bytearray(path.read_bytes())
        for i in range(len(b) // 2, min(len(b), len(b) // 2 + 32)):
            b[i] ^= 0xFF
        path.write_bytes(bytes(b))


def test_every_file_of_a_deepspeed_checkpoint_is_covered_and_damage_is_named(ds_run, tmp_path):
    from megamoe.train.trainer import load_trained_model, verify_checkpoint

    out, _ = ds_run
    step = out / "checkpoints" / "step_00000004"
    files = _files(step)
    # Both ranks' DeepSpeed files and megamoe's shards, all under the two manifests.
    assert files == sorted([
        "engine/megamoe/dense.pt", "engine/megamoe/experts_ep0000.pt", "engine/megamoe/experts_ep0001.pt",
        "engine/megamoe/meta.json", "engine/megamoe/optim_dense.pt", "engine/megamoe/optim_experts_ep0000.pt",
        "engine/megamoe/optim_experts_ep0001.pt", "engine/megamoe/trainer.pt", f"engine/{MANIFEST_NAME}",
        "engine/mp_rank_00_model_states.pt", "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "megamoe_config.json", MANIFEST_NAME,
        "rng_rank0.pt", "rng_rank1.pt", "tokenizer.model"])
    assert verify_checkpoint(str(step)).num_files == len(files) - 1  # every file but the top manifest itself
    cases = 0
    for rel in files:
        for how in ("truncate", "flip", "delete"):
            copy = tmp_path / f"c{cases}"
            shutil.copytree(step, copy)
            _damage(copy / rel, how)
            with pytest.raises(CheckpointError) as err:
                verify_checkpoint(str(copy))
            assert err.value.path == str(copy / rel), (rel, how, str(err.value))
            with pytest.raises(CheckpointError) as err:
                load_trained_model(str(copy))
            assert err.value.path == str(copy / rel), (rel, how)
            shutil.rmtree(copy)
            cases += 1
    assert cases == 3 * 18


def test_resume_skips_a_damaged_shard_and_a_kill_during_the_swap_loses_nothing(ds_run, tmp_path):
    from megamoe.train.trainer import verify_checkpoint

    ref, cache = ds_run
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    ckpts = run / "checkpoints"
    shard = ckpts / "step_00000004" / "engine" / "megamoe" / "experts_ep0001.pt"
    _damage(shard, "flip")
    # Falls back to step 2, retrains steps 3-4, and is killed (rank 0, os._exit) right after moving
    # the damaged step 4 aside to swap the new one in.
    proc = _launch(run, cache, "--resume", env={CRASH_ENV: "publish.moved_old"})
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert f"--resume: skipping step_00000004: {shard} does not match its sha256" in log, log[-3000:]
    assert "resumed from " + str(ckpts / "step_00000002") in log
    assert not (ckpts / "step_00000004").exists() and (ckpts / ".step_00000004.staging" / "step_00000004" /
                                                       MANIFEST_NAME).is_file()
    proc = _launch(run, cache, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "recovered " + str(ckpts / "step_00000004") in proc.stdout + proc.stderr
    assert _records(run) == _records(ref)
    verify_checkpoint(str(ckpts / "step_00000004"))
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002", "step_00000004"]
