"""HF conversion of DeepSpeed checkpoints does not depend on the expert-parallel layout.

Two real gloo processes build the same tiny megamoe.model.MoETransformerLM, shard it at EP=2
(experts split over the ranks) and at EP=1 (data parallel, every rank holds every expert),
wrap each in a DeepSpeed engine (megamoe.integrations.deepspeed.initialize, ZeRO-1) and save
it with megamoe.checkpoint.reshardable.save_checkpoint, adding megamoe_config.json =
{"model": to_dict(model_config)} the way the trainer does. convert_to_hf on either directory
must write the same HF safetensors (same names, bitwise equal tensors), equal to converting
the live single-process model.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megamoe.checkpoint.hf_convert import convert_to_hf  # noqa: E402
from megamoe.config import ExpertConfig, MoEConfig, RouterConfig, to_dict  # noqa: E402
from megamoe.model import ModelConfig, MoETransformerLM  # noqa: E402
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups  # noqa: E402
from megamoe.testing import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD, EP_SIZES = 2, (2, 1)
CONFIG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                     moe=MoEConfig(num_experts=4, experts=ExpertConfig(intermediate_size=16, impl="loop"),
                                   router=RouterConfig(top_k=2, aux_loss_coef=0.0)))


def build() -> MoETransformerLM:
    torch.manual_seed(0)
    model = MoETransformerLM(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # far from the init, so a shard mix-up changes the logits
    return model


def save_worker(rank: int, world: int, root: str) -> list[str]:
    from megamoe.integrations import deepspeed as mds
    from megamoe.checkpoint import reshardable

    paths = []
    for ep_size in EP_SIZES:
        groups = build_expert_parallel_groups(ep_size)
        model = apply_expert_parallel(build(), groups)
        config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10 ** 6}
        engine = mds.initialize(model, config, groups,
                                optimizer=torch.optim.SGD(mds.moe_param_groups(model), lr=0.1))
        save_dir = os.path.join(root, f"ep{ep_size}")
        paths.append(reshardable.save_checkpoint(engine, save_dir))
        if rank == 0:
            with open(os.path.join(save_dir, "megamoe_config.json"), "w", encoding="utf-8") as f:
                json.dump({"model": to_dict(CONFIG)}, f)
        dist.barrier()
    return paths


def test_hf_conversion_same_at_ep2_and_ep1(tmp_path) -> None:
    paths = run_distributed(save_worker, WORLD, str(tmp_path))
    assert paths[0] == paths[1]
    converted = {}
    for ep_size in EP_SIZES:
        report = convert_to_hf(tmp_path / f"ep{ep_size}", tmp_path / f"hf_ep{ep_size}")
        assert report.format == "mixtral"
        converted[ep_size] = safetensors_torch.load_file(str(tmp_path / f"hf_ep{ep_size}" / "model.safetensors"))
    convert_to_hf(build().eval(), tmp_path / "hf_live")
    live = safetensors_torch.load_file(str(tmp_path / "hf_live" / "model.safetensors"))
    assert sorted(converted[2]) == sorted(converted[1]) == sorted(live)
    assert any(".experts." in k for k in live)
    for key, value in live.items():
        assert torch.equal(converted[2][key], value), key
        assert torch.equal(converted[1][key], value), key
