"""Single-process checks of the EP layout helpers, boundary errors and DeepSpeed param groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from megamoe.config import ExpertConfig, MoEConfig, RouterConfig
from megamoe.dispatch.all_to_all import AllToAllDispatcher
from megamoe.layer import MoELayer
from megamoe.parallel import (ExpertParallelGroups, apply_expert_parallel, build_expert_parallel_groups,
                              edp_group_ranks, ep_group_ranks, is_expert_param)


def layer(experts: int = 4) -> MoELayer:
    return MoELayer(MoEConfig(hidden_size=8, num_experts=experts, experts=ExpertConfig(intermediate_size=4),
                              router=RouterConfig(top_k=2)))


def test_layout_matches_deepspeed_convention():
    assert ep_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp_group_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ep_group_ranks(4, 4) == [[0, 1, 2, 3]] and edp_group_ranks(4, 4) == [[0], [1], [2], [3]]


def test_impossible_layouts_are_refused():
    with pytest.raises(ValueError, match="world size must be divisible by ep_size"):
        build_expert_parallel_groups(2)  # one process, no process group: world size 1
    with pytest.raises(ValueError, match="positive integer"):
        build_expert_parallel_groups(0)
    model = nn.Sequential(layer(4))
    groups = ExpertParallelGroups(world_size=3, ep_size=3, ep_rank=0, edp_size=1, ep_group=None, edp_group=None)
    with pytest.raises(ValueError, match=r"'0' has num_experts=4, which is not divisible by ep_size=3"):
        apply_expert_parallel(model, groups)


def test_single_process_ep1_keeps_the_function():
    full = layer(4)
    sharded = apply_expert_parallel(nn.Sequential(layer(4)), build_expert_parallel_groups(1))[0]
    sharded.load_state_dict(full.state_dict())
    assert isinstance(sharded.dispatcher, AllToAllDispatcher)
    x = torch.randn(10, 8)
    torch.testing.assert_close(sharded(x), full(x))
    assert all(is_expert_param(p) and p.group_name == "ep_size_1" for p in sharded.experts.parameters())
    assert not any(is_expert_param(p) for p in sharded.router.parameters())


def test_moe_param_groups_split_dense_expert_and_no_decay():
    from megamoe.integrations.deepspeed import moe_param_groups

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), layer(4))
    apply_expert_parallel(model, build_expert_parallel_groups(1))
    groups = {g["name"] + ("/wd" if g["weight_decay"] else ""): g for g in moe_param_groups(model, weight_decay=0.1)}
    assert set(groups) == {"dense_decay/wd", "dense_no_decay", "ep_size_1/wd"}
    assert groups["ep_size_1/wd"]["moe"] is True
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups["dense_no_decay"]["params"]) == ["0.bias", "1.bias", "1.weight"]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_unsupported_deepspeed_configs_are_refused():
    from megamoe.integrations.deepspeed import validate_ds_config

    with pytest.raises(ValueError, match="fp16.enabled=true with zero_optimization.stage=0 .*stage 1, 2 or 3"):
        validate_ds_config({"fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="zero_optimization.stage=5 .* supported stages are 0, 1, 2, 3"):
        validate_ds_config({"zero_optimization": {"stage": 5}})
    validate_ds_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    for stage in (1, 2, 3):
        validate_ds_config({"zero_optimization": {"stage": stage}, "fp16": {"enabled": True}})


def test_ds_config_is_read_from_a_dict_a_json_file_or_a_yaml_file(tmp_path):
    import json

    from megamoe.integrations.deepspeed import load_ds_config

    cfg = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    (tmp_path / "ds.yaml").write_text("zero_optimization: {stage: 2}\noptimizer: {type: AdamW, params: {lr: 3e-4}}\n")
    assert load_ds_config(cfg) == load_ds_config(str(tmp_path / "ds.json")) == load_ds_config(tmp_path / "ds.yaml")
    with pytest.raises(ValueError, match="no such file"):
        load_ds_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*cannot parse"):
        load_ds_config(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_ds_config(str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match="dict or the path"):
        load_ds_config(3)


def test_missing_process_group_under_a_launcher_says_so(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 is set .*not initialised.*init_distributed\(\)"):
        build_expert_parallel_groups(2)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1 without a group: a single process
    assert build_expert_parallel_groups(1).world_size == 1


def test_dist_backend_and_gpu_per_rank_choices():
    from megamoe.parallel import cuda_device_for_rank, resolve_dist_backend

    assert resolve_dist_backend("auto", device_type="cuda") == "nccl"
    assert resolve_dist_backend("auto", device_type="cpu") == "gloo"
    assert resolve_dist_backend("gloo", device_type="cuda") == "gloo"
    with pytest.raises(ValueError, match="'nccl' needs CUDA devices"):
        resolve_dist_backend("nccl", device_type="cpu")
    with pytest.raises(ValueError, match="allowed values are 'auto', 'gloo', 'nccl'"):
        resolve_dist_backend("mpi", device_type="cpu")
    assert [cuda_device_for_rank(r, 8) for r in range(8)] == list(range(8))
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 needs GPU 1, but 1 CUDA device\(s\) are visible"):
        cuda_device_for_rank(1, 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=0 needs GPU 0, but 0 CUDA"):
        cuda_device_for_rank(0, 0)


def _clear_launcher_env(monkeypatch):
    # setenv first, so that teardown restores each variable's original state, absent included:
    # init_distributed sets them, and a LOCAL_RANK left behind makes later HF Trainers go distributed.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_init_distributed_alone_makes_a_one_process_group(monkeypatch):
    import torch.distributed as dist

    from megamoe.parallel import init_distributed

    _clear_launcher_env(monkeypatch)
    assert not dist.is_initialized()
    init_distributed(backend="auto", device_type="cpu")
    try:
        assert dist.get_world_size() == 1 and dist.get_rank() == 0 and dist.get_backend() == "gloo"
        groups = build_expert_parallel_groups(1)
        assert groups.ep_group is not None and groups.world_size == 1
        init_distributed()  # a second call keeps the group
    finally:
        dist.destroy_process_group()


def test_init_distributed_with_an_incomplete_launcher_environment(monkeypatch):
    from megamoe.parallel import init_distributed

    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT is not"):
        init_distributed(device_type="cpu")
