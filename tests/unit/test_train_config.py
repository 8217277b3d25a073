"""megamoe train's config: YAML 1:1, dotted overrides, did-you-mean, world-size checks, optimizer choice."""
import math
import os

import pytest
import torch
import yaml

from megamoe import cli
from megamoe.config import ConfigError, to_dict
from megamoe.train.backends import build_optimizer, lr_lambda, select_optimizer_impl
from megamoe.train.config import (LoopConfig, TrainConfig, apply_overrides, check_world_size, config_from_mapping,
                                  load_config, parse_overrides)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE_CFG = os.path.join(ROOT, "configs", "tiny_single.yaml")
TINY_CFG = os.path.join(ROOT, "configs", "tiny.yaml")
TORCH = ["parallel.backend=torch", "parallel.ep_size=1"]


def test_shipped_configs_load_and_round_trip():
    cfg = load_config(SINGLE_CFG)
    assert cfg.parallel.backend == "torch" and cfg.model.moe.num_experts == 8
    assert config_from_mapping(to_dict(cfg)) == cfg
    raw = yaml.safe_load(open(TINY_CFG))
    assert raw["parallel"] == {"backend": "deepspeed", "ep_size": 2, "zero_stage": 1, "dist_backend": "auto"}
    cfg2 = load_config(TINY_CFG, TORCH)
    assert cfg2.model == cfg.model  # same model in both, only the parallel layout differs


def test_overrides_are_dotted_and_yaml_typed():
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=null", "e=true", "f=3e-4", "g=text"]) == [
        (["a", "b"], 1), (["c"], [1, 2]), (["d"], None), (["e"], True), (["f"], 3e-4), (["g"], "text")]
    cfg = load_config(SINGLE_CFG, ["train.steps=7", "model.moe.router.top_k=1", "model.moe.router.aux_loss_coef=0"])
    assert cfg.train.steps == 7 and cfg.model.moe.router.top_k == 1 and cfg.model.moe.router.aux_loss_coef == 0
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}



@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", r"unknown config key 'train\.stpes' \(did you mean 'steps'\?\)"),
    ("trian.steps=3", r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    ("model.moe.router.topk=2", r"unknown config key 'model\.moe\.router\.topk' \(did you mean 'top_k'\?\)"),
    ("model.moe.router.name=tpok", r"RouterConfig\.name='tpok' is invalid: unknown router"),
    ("train.precision=fp8", r"train\.precision='fp8' is invalid: allowed values are 'fp32', 'bf16', 'fp16'"),
    ("train.precision=fp16",
     r"train\.precision='fp16' is invalid with parallel\.backend='torch' .* zero_stage 1, 2 or 3"),
    ("parallel.zero_stage=4", r"parallel\.zero_stage=4 is invalid: allowed values are 0, 1, 2, 3"),
    ("data.seq_len=4096", r"data\.seq_len=4096 is invalid: must be <= model\.max_seq_len=128"),
    ("data.source=files", r"data\.files is empty"),
    ("parallel.backend=jax", r"parallel\.backend='jax' is invalid"),
    ("steps", r"override 'steps' is invalid: write key=value"),
    ("train.steps.x=1", r"train\.steps is a value, not a section"),
])
def test_bad_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SINGLE_CFG, [override])


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"data\.files: no such file\(s\): .*missing\.jsonl"):
        load_config(SINGLE_CFG, ["data.source=files", f"data.files=[{tmp_path}/missing.jsonl]"])
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*no such file"):
        load_config(SINGLE_CFG, [f"data.tokenizer={tmp_path}/sp.model"])


def test_world_size_checks():
    cfg = load_config(SINGLE_CFG, ["parallel.ep_size=2"])
    with pytest.raises(ConfigError, match=r"parallel\.ep_size=2 is invalid with parallel\.backend='torch'"):
        check_world_size(cfg, 2)
    ds = TrainConfig(model=cfg.model, parallel=cfg.parallel.__class__(backend="deepspeed", ep_size=2))
    with pytest.raises(ConfigError, match=r"parallel\.ep_size=2 does not fit the world size 3"):
        check_world_size(ds, 3)
    check_world_size(ds, 4)
    ds3 = TrainConfig(model=cfg.model, parallel=cfg.parallel.__class__(backend="deepspeed", ep_size=3))
    with pytest.raises(ConfigError, match=r"must divide model\.moe\.num_experts=8"):
        check_world_size(ds3, 3)


def test_cli_refuses_bad_world_before_any_process_group(monkeypatch, capsys):
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc = cli.main(["train", "--config", SINGLE_CFG, "parallel.ep_size=2"])
    assert rc == 2 and not dist.is_initialized()
    assert "parallel.ep_size=2" in capsys.readouterr().err


def test_deepspeed_backend_needs_its_integration():
    from megamoe.train.config import _module_exists
    have = _module_exists("megamoe.integrations.deepspeed") and _module_exists("megamoe.parallel")
    if have:
        assert load_config(TINY_CFG).parallel.backend == "deepspeed"
    else:
        with pytest.raises(ConfigError, match="parallel.backend='deepspeed' needs the module"):
            load_config(TINY_CFG)


def test_optimizer_selection_logic():
    assert select_optimizer_impl("cuda", apex_available=True) == "apex_fused_adam"
    assert select_optimizer_impl("cuda", apex_available=False) == "torch_adamw_fused"
    assert select_optimizer_impl("cpu", apex_available=True) == "torch_adamw"
    assert select_optimizer_impl("cpu", apex_available=False) == "torch_adamw"


def test_build_optimizer_both_cases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = LoopConfig(lr=1e-3, weight_decay=0.1)
    opt, name = build_optimizer(model.parameters(), cfg, device_type="cpu")
    assert name == "torch_adamw" and isinstance(opt, torch.optim.AdamW)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]  # norms and biases are not decayed

    class FakeFusedAdam:  # stands in for apex.optimizers.FusedAdam, which needs CUDA
        def __init__(self, groups, **kw):
            self.groups, self.kw = groups, kw

    opt, name = build_optimizer(model.parameters(), cfg, device_type="cuda", apex_cls=FakeFusedAdam)
    assert name == "apex_fused_adam" and opt.kw["adam_w_mode"] is True and opt.kw["lr"] == 1e-3


def test_lr_schedule_warmup_then_cosine():
    cfg = LoopConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 110))


def test_zero3_and_fp16_are_accepted_for_deepspeed():
    from megamoe.train.backends import deepspeed_config

    cfg = load_config(TINY_CFG, ["parallel.zero_stage=3", "train.precision=fp16"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match=r"train\.precision='fp16' is invalid .* parallel\.zero_stage=0"):
        load_config(TINY_CFG, ["parallel.zero_stage=0", "train.precision=fp16"])
