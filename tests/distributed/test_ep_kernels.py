"""Expert parallelism with the Triton path (ExpertConfig.impl='triton'): an EP=2 MoELayer on 2
real gloo processes, whose local permute and final combine are the Triton kernels (under the
interpreter on CPU), equals the single-process layer on each rank's chunk, outputs and every
gradient, dropless and with capacity drops. Same construction and tolerance as
test_ep_layer.py (which covers the loop path).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="megamoe's Triton kernels need triton (pip install 'megamoe[triton]')")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET!=1: the kernels cannot run here", allow_module_level=True)

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig  # noqa: E402
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups  # noqa: E402
from megamoe.testing import run_distributed  # noqa: E402

TOKENS_PER_RANK, HIDDEN, EXPERTS, WORLD = 10, 16, 4, 2
TOL = dict(rtol=1e-4, atol=1e-5)


def _case(capacity_factor, impl):
    torch.manual_seed(11)
    cfg = MoEConfig(hidden_size=HIDDEN, num_experts=EXPERTS,
                    experts=ExpertConfig(intermediate_size=8, impl=impl),
                    router=RouterConfig(top_k=2, aux_loss_coef=0.01, options={"capacity_factor": capacity_factor}))
    layer = MoELayer(cfg)
    x = torch.randn(WORLD * TOKENS_PER_RANK, HIDDEN)
    g = torch.randn(WORLD * TOKENS_PER_RANK, HIDDEN)
    return layer, x, g


def _chunk(t, rank):
    return t[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK]


def worker(rank: int, world: int) -> dict:
    groups = build_expert_parallel_groups(world)
    out = {}
    for cf in (None, 1.0):
        layer, x, g = _case(cf, "triton")
        apply_expert_parallel(layer, groups)
        xi = _chunk(x, rank).clone().requires_grad_(True)
        y = layer(xi)
        (y * _chunk(g, rank)).sum().backward()
        out[cf] = {"out": y.detach(), "gx": xi.grad, "router": layer.router.weight.grad,
                   "experts": {n: p.grad.clone() for n, p in layer.experts.named_parameters()},
                   "offset": layer.dispatcher.local_expert_offset}
    return out


@pytest.mark.distributed
def test_ep2_triton_path_matches_single_process():
    results = run_distributed(worker, WORLD)
    for cf in (None, 1.0):
        layer, x, g = _case(cf, "loop")
        x = x.clone().requires_grad_(True)
        outs = []
        for r in range(WORLD):
            y = layer(_chunk(x, r))
            (y * _chunk(g, r)).sum().backward()
            outs.append(y.detach())
        full = {n: torch.zeros_like(p) for n, p in layer.experts.named_parameters()}
        for rank, res in enumerate(results):
            got = res[cf]
            torch.testing.assert_close(got["out"], outs[rank], **TOL)
            torch.testing.assert_close(got["gx"], _chunk(x.grad, rank), **TOL)
            for n, grad in got["experts"].items():
                full[n][got["offset"]:got["offset"] + grad.shape[0]] += grad
        torch.testing.assert_close(sum(r[cf]["router"] for r in results), layer.router.weight.grad, **TOL)
        for n, p in layer.experts.named_parameters():
            torch.testing.assert_close(full[n], p.grad, **TOL, msg=lambda m: f"capacity {cf} {n}: {m}")
