"""CUDA-only checks of the layer's Triton path (bf16, top-k dropless and under a capacity): no host synchronisation
under torch.cuda.set_sync_debug_mode("error"), forward+backward captured in a CUDA graph and
replayed on new data equal to eager, and torch.compile (inductor, fullgraph) equal to eager.

Skipped without a GPU; tools/gpu_check.sh runs them on one. (On CPU the same properties are
checked as far as they apply in test_kernels_layer.py: fullgraph compile, no syncing aten op.)
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")
pytest.importorskip("triton", reason="megamoe's Triton kernels need triton (pip install 'megamoe[triton]')")

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig  # noqa: E402

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 512, 256, 384, 8, 2
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


CAPACITY = pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])


def _layer(shared: int = 1, capacity_factor: float | None = None) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=HIDDEN, num_experts=EXPERTS,
                    experts=ExpertConfig(intermediate_size=INTER, impl="triton"),
                    router=RouterConfig(top_k=TOP_K, aux_loss_coef=0.01,
                                        options={"capacity_factor": capacity_factor}),
                    num_shared_experts=shared)
    return MoELayer(cfg).to(device="cuda", dtype=torch.bfloat16)


def _step(layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    (out * upstream).sum().backward()
    return out


def _inputs(seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    up = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, up


def test_auto_picks_triton_on_cuda_bf16():
    layer = _layer()
    x, _ = _inputs(0)
    assert layer.experts.impl_for(x) == "triton"
    cfg = MoEConfig(hidden_size=HIDDEN, num_experts=EXPERTS, experts=ExpertConfig(intermediate_size=INTER))
    assert MoELayer(cfg).experts.impl_for(x) == "triton"


@CAPACITY
def test_forward_backward_never_synchronises(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor)
    x, up = _inputs(1)
    _step(layer, x.clone().requires_grad_(True), up)  # compiles the kernels, warms the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(layer, x.clone().requires_grad_(True), up)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@CAPACITY
def test_cuda_graph_capture_and_replay_equal_eager(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor)
    reference = copy.deepcopy(layer)
    x0, up = _inputs(2)
    static_x = x0.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            _step(layer, static_x, up)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(layer, static_x, up)

    x_new, _ = _inputs(3)
    with torch.no_grad():
        static_x.copy_(x_new)
    graph.replay()
    torch.cuda.synchronize()

    x_ref = x_new.clone().requires_grad_(True)
    out_ref = _step(reference, x_ref, up)
    torch.testing.assert_close(static_out, out_ref, **BF16_TOL)
    torch.testing.assert_close(static_x.grad, x_ref.grad, **BF16_TOL)
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **BF16_TOL, msg=lambda m: f"{name}: {m}")


@CAPACITY
def test_inductor_compile_fullgraph_equals_eager(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor)
    x, up = _inputs(4)

    def loss_fn(x_):
        return (layer(x_) * up).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    params = list(layer.parameters())
    x1 = x.clone().requires_grad_(True)
    g_eager = torch.autograd.grad(loss_fn(x1), [x1] + params)
    x2 = x.clone().requires_grad_(True)
    g_comp = torch.autograd.grad(compiled(x2), [x2] + params)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, **BF16_TOL)
