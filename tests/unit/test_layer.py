"""MoELayer against real references: the dense MLP, the plain per-slot reference, gradcheck."""
import pytest
import torch
from torch import nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.experts import reference_moe


def layer(num_experts=4, hidden=16, inter=32, top_k=2, activation="swiglu", bias=False, impl="auto",
          dtype=torch.float32, **router_kw):
    router_kw.setdefault("aux_loss_coef", 0.01)
    cfg = MoEConfig(hidden_size=hidden, num_experts=num_experts,
                    experts=ExpertConfig(intermediate_size=inter, activation=activation, bias=bias, impl=impl),
                    router=RouterConfig(top_k=top_k, **router_kw))
    return MoELayer(cfg).to(dtype)


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_one_expert_top1_equals_dense_mlp():
    moe = layer(num_experts=1, top_k=1)
    dense = DenseSwiGLU(16, 32)
    with torch.no_grad():
        dense.gate.weight.copy_(moe.experts.gate_up_proj[0, :32])
        dense.up.weight.copy_(moe.experts.gate_up_proj[0, 32:])
        dense.down.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), dense(x))


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("inter", [32, 8])  # combine weight applied on the output (I > H) or hidden (I < H) side
def test_fast_path_equals_reference_outputs_and_grads(activation, bias, capacity_factor, inter):
    moe = layer(activation=activation, bias=bias, inter=inter, options={"capacity_factor": capacity_factor})
    if bias:
        with torch.no_grad():
            for p in (moe.experts.first_bias, moe.experts.down_proj_bias):
                p.normal_()
    x = torch.randn(40, 16, requires_grad=True)
    res = moe.compute(x)
    d = res.decision
    ref = reference_moe(moe.experts, x, d.expert_ids_TK, d.weights_TK)
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(ref)
    params = [x] + [p for p in moe.parameters()]
    g_fast = torch.autograd.grad((res.out * upstream).sum() + res.aux_loss, params, allow_unused=True)
    res2 = moe.compute(x)
    ref2 = reference_moe(moe.experts, x, res2.decision.expert_ids_TK, res2.decision.weights_TK)
    g_ref = torch.autograd.grad((ref2 * upstream).sum() + res2.aux_loss, params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_gemm_equals_loop(bias):
    torch.manual_seed(1)
    moe_g = layer(num_experts=8, hidden=32, inter=64, top_k=2, impl="grouped", bias=bias)
    moe_l = layer(num_experts=8, hidden=32, inter=64, top_k=2, impl="loop", bias=bias)
    moe_l.load_state_dict(moe_g.state_dict())
    x = torch.randn(64, 32)
    xg, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yg, yl = moe_g(xg), moe_l(xl)
    torch.testing.assert_close(yg, yl, rtol=1e-5, atol=1e-5)
    yg.square().sum().backward()
    yl.square().sum().backward()
    torch.testing.assert_close(xg.grad, xl.grad, rtol=1e-4, atol=1e-5)
    for (n, pg), pl in zip(moe_g.named_parameters(), moe_l.parameters()):
        torch.testing.assert_close(pg.grad, pl.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_grouped_refuses_unaligned_shapes_clearly():
    moe = layer(hidden=6, inter=10, impl="grouped", top_k=1)
    with pytest.raises(ValueError, match="16-byte aligned"):
        moe(torch.randn(4, 6))


def test_gradcheck_float64():
    moe = layer(num_experts=3, hidden=4, inter=5, top_k=2, bias=True, dtype=torch.float64, z_loss_coef=0.1)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    # Routing is piecewise constant in x; at a random point no tie lies within eps.
    assert torch.autograd.gradcheck(lambda x_: moe.compute(x_).out, (x,), eps=1e-6, atol=1e-5)
    w = moe.experts.gate_up_proj
    assert torch.autograd.gradcheck(lambda r: _with_param(moe.router, "weight", r, lambda: moe.compute(x).out),
                                    (moe.router.weight.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda w_: _with_param(moe.experts, "down_proj", w_, lambda: moe.compute(x).out),
                                    (moe.experts.down_proj.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda w_: _with_param(moe.experts, "gate_up_proj", w_, lambda: moe.compute(x).out),
                                    (w.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-5)


def _with_param(module, name, value, fn):
    """Evaluate fn() with module.<name> temporarily replaced by a plain tensor."""
    saved = module._parameters.pop(name)
    try:
        setattr(module, name, value)
        return fn()
    finally:
        delattr(module, name)
        module._parameters[name] = saved


def test_shared_expert_is_added():
    cfg = MoEConfig(hidden_size=16, num_experts=4, experts=ExpertConfig(32), router=RouterConfig(top_k=2),
                    num_shared_experts=2, shared_expert_gate=True)
    moe = MoELayer(cfg)
    assert moe.shared_expert.up_proj.out_features == 64
    x = torch.randn(10, 16)
    res = moe.compute(x)
    routed = reference_moe(moe.experts, x, res.decision.expert_ids_TK, res.decision.weights_TK)
    torch.testing.assert_close(res.out, routed + moe.shared_expert(x), rtol=1e-5, atol=1e-6)


def test_expert_with_no_tokens_and_all_dropped():
    moe = layer(num_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0
    x = torch.randn(8, 16)
    x[:, 0] = 5.0  # every token picks expert 2
    x.requires_grad_()
    res = moe.compute(x)
    assert res.decision.tokens_per_expert_E.tolist() == [0, 0, 8, 0]
    assert res.stats.max_vio.item() == pytest.approx(3.0)
    res.out.sum().backward()
    assert moe.experts.down_proj.grad[0].abs().sum() == 0 and moe.experts.down_proj.grad[2].abs().sum() > 0


def test_stats_dropped_fraction():
    moe = layer(num_experts=4, top_k=2, options={"capacity_factor": 0.5})
    moe(torch.randn(32, 16))
    s = moe.last_stats
    kept, sel = s.tokens_per_expert_E.sum().item(), s.selected_per_expert_E.sum().item()
    assert sel == 64 and kept <= 4 * 8
    assert s.dropped_fraction.item() == pytest.approx(1 - kept / sel)


def test_bf16_autocast_router_fp32_and_close_to_fp32():
    moe = layer(num_experts=4, hidden=32, inter=64)
    x = torch.randn(24, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = moe.compute(x)
    assert res.decision.weights_TK.dtype == torch.float32
    torch.testing.assert_close(res.out.float(), ref, rtol=0.05, atol=0.05)


def test_deterministic_repeat():
    moe = layer(num_experts=8, top_k=3)
    x = torch.randn(50, 16, requires_grad=True)
    y1 = moe(x)
    (g1,) = torch.autograd.grad(y1.sum(), x)
    y2 = moe(x)
    (g2,) = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_leading_dims_and_empty_input():
    moe = layer()
    assert moe(torch.randn(2, 3, 5, 16)).shape == (2, 3, 5, 16)
    x = torch.randn(0, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 16)
    y.sum().backward()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("inter", [32, 8])
def test_expert_bank_rows_path_equals_per_expert_reference(activation, bias, inter):
    """The grouped-rows layout (used under expert parallelism) against plain per-expert autograd."""
    from megamoe.experts import ExpertBank
    torch.manual_seed(2)
    bank = ExpertBank(ExpertConfig(intermediate_size=inter, activation=activation, bias=bias, impl="loop"),
                      hidden_size=16, num_experts=4)
    if bias:
        with torch.no_grad():
            bank.first_bias.normal_()
            bank.down_proj_bias.normal_()
    sizes = torch.tensor([5, 0, 7, 3])
    x = torch.randn(15, 16, requires_grad=True)
    w = torch.rand(15, requires_grad=True)
    upstream = torch.randn(15, 16)
    params = [x, w] + list(bank.parameters())
    y = bank(x, sizes, w)
    g_fast = torch.autograd.grad((y * upstream).sum(), params)
    starts = [0, 5, 5, 12, 15]
    ref = torch.cat([bank.expert_forward(x[starts[e]:starts[e + 1]], e) for e in range(4)]) * w.unsqueeze(1)
    g_ref = torch.autograd.grad((ref * upstream).sum(), params)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
