"""The ``megamoe`` command line as a user meets it: --version, quiet --help, clean errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megamoe import __version__, cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _megamoe(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "megamoe.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"megamoe {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["launch", "--help"]])
def test_help_prints_no_warnings(args):
    res = _megamoe(*args)
    assert res.returncode == 0 and "usage:" in res.stdout
    assert res.stderr == "", res.stderr


def test_print_config_needs_no_world():
    # configs/tiny.yaml has ep_size=2; printing it on one process is fine (running it is not).
    res = _megamoe("train", "--config", "configs/tiny.yaml", "--print-config")
    assert res.returncode == 0, res.stderr
    assert "ep_size: 2" in res.stdout and res.stderr == ""


@pytest.mark.parametrize("args,message", [
    (["--router", "nope"], "megamoe demo: error: RouterConfig.name='nope' is invalid: unknown router"),
    (["--top-k", "9"], "megamoe demo: error: RouterConfig.top_k=9 is invalid: must be <= MoEConfig.num_experts=8"),
    (["--steps", "0"], "megamoe demo: error: --steps=0 is invalid"),
])
def test_demo_reports_config_errors_without_a_traceback(args, message, capsys):
    assert cli.main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_routing_exports_what_the_readme_names():
    from megamoe.routing import seed_estimator_draws  # noqa: F401
    from megamoe.train.objectives import estimator_loss  # noqa: F401
