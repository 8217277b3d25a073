"""``megamoe rl`` end to end: a very short real Pendulum run through the CLI, its outputs, and
clear errors for bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamoe.cli import main
from megamoe.research.rl import SACAgent, mujoco_available

ROOT = Path(__file__).resolve().parents[2]


def test_rl_cli_short_pendulum_run_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "megamoe.cli", "rl", "--env", "Pendulum-v1", "--components", "3", "--steps", "220",
           "--start-steps", "180", "--update-after", "180", "--batch-size", "32", "--hidden", "16,16",
           "--eval-every", "200", "--eval-episodes", "1", "--checkpoint-every", "100", "--seed", "3",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "220/220" in proc.stderr  # the tqdm bar reached the end
    assert f"outputs in {out}" in proc.stdout

    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "resume.pt", "returns.jsonl",
                                                     "returns.png"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["env"] == "Pendulum-v1" and cfg["sac"]["components"] == 3 and cfg["sac"]["hidden"] == [16, 16]

    rows = [json.loads(line) for line in (out / "returns.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["episode"], r["step"], r["length"]) for r in train] == [(1, 200, 200)]  # Pendulum truncates at 200
    assert [(r["round"], r["step"], r["episodes"]) for r in evals] == [(1, 200, 1)]
    # Pendulum rewards lie in [-16.3, 0] per step
    assert all(-16.3 * 200 <= r["return"] <= 0.0 for r in rows)
    assert "critic_loss" in train[0] and "alpha" in train[0]

    png = (out / "returns.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000

    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 220 and ckpt["env"] == "Pendulum-v1"
    agent = SACAgent.from_checkpoint(ckpt)
    assert agent.cfg.components == 3
    for _ in range(20):
        a = agent.act(torch.randn(3).numpy())
        assert a.shape == (1,) and -2.0 <= float(a[0]) <= 2.0


@pytest.mark.parametrize("argv,message", [
    (["--components", "0"], "argument --components: must be an integer >= 1, got '0'"),
    (["--steps", "ten"], "argument --steps: must be an integer >= 1, got 'ten'"),
    (["--hidden", "64,x"], "argument --hidden: must be comma-separated positive layer sizes"),
    (["--gamma", "1.5"], "argument --gamma: must be a finite number in [0, 1], got '1.5'"),
    (["--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
])
def test_rl_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rl", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("env_id,message", [
    ("Pendulum-v9", "Did you mean 'Pendulum-v1'"),
    ("CartPole-v1", "Discrete action space; SAC/PMOE needs continuous (Box) actions"),
])
def test_rl_cli_rejects_unusable_environments(env_id, message, tmp_path, capsys):
    assert main(["rl", "--env", env_id, "--steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(mujoco_available(), reason="mujoco is installed here")
def test_rl_cli_explains_missing_mujoco(tmp_path, capsys):
    assert main(["rl", "--env", "HalfCheetah-v5", "--steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'gymnasium[mujoco]'" in capsys.readouterr().err


def test_rl_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "returns.jsonl").write_text("{}\n")
    assert main(["rl", "--steps", "5", "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_rl_cli_explains_missing_mujoco_when_its_import_fails(tmp_path, monkeypatch, capsys):
    # a None entry in sys.modules makes `import mujoco` raise ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "mujoco", None)
    assert not mujoco_available()
    assert main(["rl", "--env", "HalfCheetah-v5", "--steps", "5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'HalfCheetah-v5' is a MuJoCo task but 'mujoco' cannot be imported" in err
    assert "pip install 'gymnasium[mujoco]'" in err and "pip install -e '.[mujoco]'" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not mujoco_available(), reason="needs the mujoco extra (pip install -e '.[mujoco]')")
def test_rl_cli_trains_on_a_mujoco_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MuJoCo's own handler would append its warnings to ./MUJOCO_LOG.TXT
    out = tmp_path / "cheetah"
    assert main(["rl", "--env", "HalfCheetah-v5", "--steps", "80", "--start-steps", "50", "--update-after", "50",
                 "--batch-size", "16", "--hidden", "16,16", "--eval-every", "0", "--no-progress",
                 "--out", str(out)]) == 0
    assert "80 steps" in capsys.readouterr().out
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()  # HalfCheetah's model makes MuJoCo warn on load
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ckpt["obs_dim"], ckpt["act_dim"], ckpt["env"]) == (17, 6, "HalfCheetah-v5")
    agent = SACAgent.from_checkpoint(ckpt)
    a = agent.act(torch.zeros(17).numpy())
    assert a.shape == (6,) and float(abs(a).max()) <= 1.0


_SMALL = ["--components", "3", "--start-steps", "150", "--update-after", "150", "--batch-size", "16", "--hidden",
          "16,16", "--eval-every", "250", "--eval-episodes", "1", "--checkpoint-every", "150", "--seed", "5",
          "--no-progress"]


def test_rl_cli_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["rl", *_SMALL, "--steps", "500", "--out", str(full)]) == 0
    # a run stopped at step 300 (resume.pt at its first episode end after 150 steps: step 200) ...
    assert main(["rl", *_SMALL, "--steps", "300", "--out", str(part)]) == 0
    assert torch.load(part / "resume.pt", weights_only=False)["step"] == 200
    # ... continued to 500 steps with the run's saved settings
    assert main(["rl", "--resume", "--out", str(part), "--steps", "500", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert (part / "returns.jsonl").read_text() == (full / "returns.jsonl").read_text()
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 500
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for opt in ("actor_opt", "critic_opt", "alpha_opt"):
        sa, sb = a[opt]["state"], b[opt]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), opt
    assert json.loads((part / "config.json").read_text())["steps"] == 500


@pytest.mark.parametrize("extra,message", [
    (["--hidden", "32"], "--hidden (32,) differs from the resumed run's (16, 16)"),
    (["--steps", "100"], "--steps 100 is below the resumed run's step 200"),
])
def test_rl_cli_resume_refuses_conflicting_settings(extra, message, tmp_path, capsys):
    assert main(["rl", *_SMALL, "--steps", "210", "--out", str(tmp_path)]) == 0
    assert main(["rl", "--resume", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_rl_cli_resume_needs_a_resumable_run(tmp_path, capsys):
    assert main(["rl", "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err
    assert main(["rl", "--resume", "--out", str(tmp_path)]) == 2
    assert "holds no resumable run" in capsys.readouterr().err


def _flip_middle(path):
    b = bytearray(path.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 16):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage,message", [
    (lambda out: _flip_middle(out / "resume.pt"), "resume.pt: record .* fails its CRC check"),
    (lambda out: os.truncate(out / "resume.pt", 1000), "resume.pt: is not a readable torch.save archive"),
    (lambda out: (out / "config.json").write_text('{"env": '), "config.json: is not valid JSON"),
    (lambda out: torch.save({"step": 3}, out / "resume.pt"), "resume.pt: is not a megamoe rl resume state"),
])
def test_rl_cli_resume_names_a_damaged_file(damage, message, tmp_path, capsys):
    assert main(["rl", *_SMALL, "--steps", "210", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "returns.jsonl").read_text()
    damage(tmp_path)
    assert main(["rl", "--resume", "--out", str(tmp_path), "--steps", "300"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "start a new run with another --out" in err, err
    assert (tmp_path / "returns.jsonl").read_text() == before  # nothing rewritten
