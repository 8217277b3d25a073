"""``megamoe convert`` end to end: a consolidated megamoe directory to HF and back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import ExpertConfig, MoEConfig, RouterConfig  # noqa: E402
from megamoe.checkpoint import load_consolidated, save_consolidated  # noqa: E402
from megamoe.checkpoint import convert_cmd, hf_convert  # noqa: E402
from megamoe.stats import moe_layers  # noqa: E402
from megamoe.cli import main  # noqa: E402
from megamoe.model import ModelConfig, MoETransformerLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _model():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(num_experts=4, experts=ExpertConfig(intermediate_size=16), num_shared_experts=1,
                                    router=RouterConfig(top_k=2, options={"score_func": "sigmoid"})))
    m = MoETransformerLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        for layer in moe_layers(m):
            layer.router.enable_selection_bias().normal_(0.0, 0.3)
    return m


def test_cli_converts_to_hf_and_back(tmp_path):
    model = _model()
    save_consolidated(model, tmp_path / "mm")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(tmp_path / "mm"),
                           str(tmp_path / "hf"), "--format", "auto"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote glm4_moe checkpoint" in proc.stdout and "fp32 max abs diff" in proc.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "glm4_moe"

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0  # direction detected
    back = load_consolidated(tmp_path / "back")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_cli_refusal_is_a_clear_error(tmp_path, capsys):
    save_consolidated(_model(), tmp_path / "mm")
    assert main(["convert", str(tmp_path / "mm"), str(tmp_path / "out"), "--format", "deepseek_v3"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot convert to 'deepseek_v3'" in err and "glm4_moe" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_choices_mirror_the_converter():
    assert convert_cmd.FORMATS == hf_convert.FORMATS
    assert convert_cmd.DEFAULT_ATOL == hf_convert.DEFAULT_ATOL
