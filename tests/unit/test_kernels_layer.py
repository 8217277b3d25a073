"""The whole Triton pipeline of one MoE layer (permute kernel, torch._grouped_mm, fused weighted
activation kernel, grouped_mm, combine kernel) against the references: the plain per-slot
reference_moe and the CPU loop path, outputs and every gradient; plus torch.compile
(fullgraph) and the absence of host synchronisation on the dropless path.

Runs under Triton's interpreter without a GPU (see tests/conftest.py), compiled on CUDA.
torch._grouped_mm runs on CPU too, for 16-byte aligned rows (hidden and intermediate sizes
here are multiples of 8).
"""
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="megamoe's Triton kernels need triton (pip install 'megamoe[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET!=1: the kernels cannot run here", allow_module_level=True)

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig  # noqa: E402
from megamoe.dispatch.all_to_all import AllToAllDispatcher  # noqa: E402
from megamoe.experts import reference_moe  # noqa: E402


def _layer(impl, *, activation="swiglu", bias=False, capacity_factor=None, shared=0, hidden=16, inter=24,
           experts=6, top_k=2, dtype=torch.float32, dispatcher=None, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=hidden, num_experts=experts,
                    experts=ExpertConfig(intermediate_size=inter, activation=activation, bias=bias, impl=impl),
                    router=RouterConfig(top_k=top_k, aux_loss_coef=0.01, options={"capacity_factor": capacity_factor}),
                    num_shared_experts=shared)
    layer = MoELayer(cfg, dispatcher=dispatcher)
    if bias:
        with torch.no_grad():
            for p in (layer.experts.first_bias, layer.experts.down_proj_bias):
                p.normal_()
    return layer.to(device=DEVICE, dtype=dtype)


def _grads(layer, x, upstream, out_fn):
    x = x.detach().clone().requires_grad_(True)
    res = layer.compute(x)
    out = out_fn(layer, x, res)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((out.float() * upstream).sum() + res.aux_loss, params, allow_unused=True)
    return out, grads


def _routed_plus_shared(layer, x, res):
    return res.out


def _reference(layer, x, res):
    d = res.decision
    out = reference_moe(layer.experts, x, d.expert_ids_TK, d.weights_TK)
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(x)
    return out


def _assert_matches(layer, x, upstream, **against):
    """``layer``'s output and every gradient (input and parameters) equal each of ``against``:
    label -> (layer, out_fn), fp32 tolerances."""
    out, grads = _grads(layer, x, upstream, _routed_plus_shared)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for label, (other, out_fn) in against.items():
        other_out, other_grads = _grads(other, x, upstream, out_fn)
        torch.testing.assert_close(out, other_out, rtol=1e-5, atol=1e-5, msg=lambda m: f"out vs {label}: {m}")
        for name, a, b in zip(names, grads, other_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} vs {label}: {m}")


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_triton_pipeline_equals_reference_and_loop(activation, bias, capacity_factor):
    shared = 1 if activation == "swiglu" else 0
    fast = _layer("triton", activation=activation, bias=bias, capacity_factor=capacity_factor, shared=shared)
    loop = _layer("loop", activation=activation, bias=bias, capacity_factor=capacity_factor, shared=shared)
    loop.load_state_dict(fast.state_dict())
    _assert_matches(fast, torch.randn(30, 16, device=DEVICE), torch.randn(30, 16, device=DEVICE),
                    reference=(fast, _reference), loop=(loop, _routed_plus_shared))


@pytest.mark.parametrize("bias", [False, True])
def test_triton_pipeline_bf16_close_to_fp32(bias):
    fast = _layer("triton", dtype=torch.bfloat16, shared=1, bias=bias)
    ref = _layer("loop", shared=1, bias=bias)
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(40, 16, device=DEVICE)
    upstream = torch.randn(40, 16, device=DEVICE)
    out, g_fast = _grads(fast, x.bfloat16(), upstream, _routed_plus_shared)
    out_ref, g_ref = _grads(ref, x.bfloat16().float(), upstream, _routed_plus_shared)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_ref, rtol=0.05, atol=0.05)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_empty_expert_one_row_and_empty_batch():
    layer = _layer("triton", top_k=1, experts=4)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0
    x = torch.randn(8, 16, device=DEVICE)
    x[:, 0] = 5.0
    x[3, 0] = -5.0  # one token leaves expert 2: it becomes the only row of another expert
    out, grads = _grads(layer, x, torch.ones(8, 16, device=DEVICE), _routed_plus_shared)
    ref, ref_grads = _grads(layer, x, torch.ones(8, 16, device=DEVICE), _reference)
    counts = layer.compute(x).decision.tokens_per_expert_E.tolist()
    assert sorted(counts) == [0, 0, 1, 7]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    empty = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = layer(empty)
    y.sum().backward()
    assert y.shape == (0, 16) and empty.grad.shape == (0, 16)


def test_all_to_all_dispatcher_uses_the_same_kernels():
    """The expert-parallel dispatcher (one rank, no process group) runs the same pipeline."""
    local = _layer("triton")
    ep = _layer("triton", dispatcher=AllToAllDispatcher(6, None))
    ep.load_state_dict(local.state_dict())
    x = torch.randn(20, 16, device=DEVICE)
    up = torch.randn(20, 16, device=DEVICE)
    out_a, g_a = _grads(local, x, up, _routed_plus_shared)
    out_b, g_b = _grads(ep, x, up, _routed_plus_shared)
    torch.testing.assert_close(out_a, out_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_deterministic_repeat():
    layer = _layer("triton", top_k=3)
    x = torch.randn(25, 16, device=DEVICE)
    up = torch.randn(25, 16, device=DEVICE)
    out1, g1 = _grads(layer, x, up, _routed_plus_shared)
    out2, g2 = _grads(layer, x, up, _routed_plus_shared)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
               "bincount", "item", "repeat_interleave"}


def _syncing(name: str, kwargs: dict) -> bool:
    """An aten op that reads device data back to the host or sizes its output by it
    (repeat_interleave only when not told its output size)."""
    return name in SYNCING_OPS and not (name == "repeat_interleave" and kwargs.get("output_size"))


@pytest.mark.parametrize("capacity_factor,bias", [(None, False), (1.25, False), (None, True)])
def test_torch_compile_fullgraph_equals_eager_and_has_no_host_sync(capacity_factor, bias):
    """The top-k layer (dropless, and under a capacity) traces as one graph, forward and
    backward (the kernels are custom ops with fake implementations), computes what eager does,
    and neither graph holds an op that reads device values on the host (an .item() or
    .tolist() anywhere would show up as aten._local_scalar_dense). bf16: torch._grouped_mm's
    fake implementation accepts only it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    layer = _layer("triton", shared=1, dtype=torch.bfloat16, capacity_factor=capacity_factor, bias=bias)
    x = torch.randn(24, 16, device=DEVICE, dtype=torch.bfloat16)
    up = torch.randn(24, 16, device=DEVICE, dtype=torch.bfloat16)

    def step(x_):
        y = layer(x_)
        return (y * up).sum()

    compiled = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    params = list(layer.parameters())
    x1 = x.clone().requires_grad_(True)
    loss = step(x1)
    g_eager = torch.autograd.grad(loss, [x1] + params)
    x2 = x.clone().requires_grad_(True)
    loss_c = compiled(x2)
    g_comp = torch.autograd.grad(loss_c, [x2] + params)
    torch.testing.assert_close(loss_c, loss, rtol=1e-2, atol=1e-2)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert len(graphs) == 2  # one forward, one backward graph: no graph break anywhere
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("megamoe.expert_act" in op for op in ops) and any("megamoe.combine" in op for op in ops)
    assert any("megamoe.row_bias" in op for op in ops) == bias
    syncing = [op for g in graphs for n in g.graph.nodes if n.op == "call_function"
               and hasattr(n.target, "__name__") and _syncing(n.target.__name__.split(".")[0], dict(n.kwargs))
               for op in [str(n.target)]]
    assert syncing == []


class _HostSyncs(TorchDispatchMode):
    """Records, in eager mode, every aten op that would synchronise with the device."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _syncing(func.__name__.split(".")[0], kwargs or {}):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("capacity_factor,bias", [(None, False), (1.0, False), (0.5, False), (0.5, True)])
def test_top_k_layer_has_no_host_sync(capacity_factor, bias):
    """Forward and backward of the top-k layer never read device values on the host (routing,
    capacity drops, sort, kernels, grouped GEMMs, biases, aux loss, statistics): dropless, and
    under a capacity, whose rows are padded to the router's bound E*C instead of counted."""
    layer = _layer("triton", capacity_factor=capacity_factor, shared=1, bias=bias)
    x = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    with _HostSyncs() as mode:
        y = layer(x)
        (y * torch.randn_like(y)).sum().backward()
    assert mode.seen == []


def test_host_sync_detector_sees_the_counted_rows():
    """The expert-parallel dispatcher sizes its rows by the kept count (one .item(), the
    all-to-all needs the counts on the host anyway): the detector above must see it."""
    layer = _layer("triton", capacity_factor=1.0, dispatcher=AllToAllDispatcher(6, None))
    x = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    with _HostSyncs() as mode:
        layer(x).sum().backward()
    assert any("_local_scalar_dense" in op for op in mode.seen)


@pytest.mark.parametrize("impl", ["triton", "grouped"])
@pytest.mark.parametrize("capacity_factor", [0.75, 1.25, 2.0])
def test_capacity_padding_rows_change_nothing(impl, capacity_factor):
    """Under a capacity the local dispatcher pads the rows to E*C (or T*K): the padding rows
    (dropped slots, computed by the last expert) must add nothing to any output and pass no
    gradient to any parameter, the router included. Compared with the expert-parallel
    dispatcher on one rank, which counts its rows exactly, and with the plain reference.
    Non-zero weights are planted in the dropped slots: padding must not read them."""
    fast = _layer(impl, capacity_factor=capacity_factor, top_k=2, experts=4, seed=3)
    with torch.no_grad():  # skewed routing: expert 0 overflows while others have room to spare
        fast.router.weight[0] += 1.0
    exact = _layer(impl, capacity_factor=capacity_factor, top_k=2, experts=4, dispatcher=AllToAllDispatcher(4, None))
    exact.load_state_dict(fast.state_dict())
    x = torch.randn(40, 16, device=DEVICE) + 0.5
    up = torch.randn(40, 16, device=DEVICE)
    d = fast.compute(x).decision
    assert d.kept_bound == 4 * math.ceil(40 * 2 / 4 * capacity_factor)
    padding = min(40 * 2, d.kept_bound) - int(d.tokens_per_expert_E.sum())
    assert (padding > 0) == (capacity_factor < 2.0)  # 2.0 keeps every slot here: nothing to pad
    _assert_matches(fast, x, up, exact_rows=(exact, _routed_plus_shared), reference=(fast, _reference))

    # Padding rows never read the weights of dropped slots (a router could leave junk there).
    from megamoe.dispatch.local import LocalDispatcher
    from megamoe.routing.base import RoutingDecision

    junk = RoutingDecision(expert_ids_TK=d.expert_ids_TK, weights_TK=torch.where(d.expert_ids_TK < 0, 7.0,
                                                                                 d.weights_TK),
                           tokens_per_expert_E=d.tokens_per_expert_E, kept_bound=d.kept_bound)
    clean = RoutingDecision(expert_ids_TK=d.expert_ids_TK, weights_TK=d.weights_TK,
                            tokens_per_expert_E=d.tokens_per_expert_E, kept_bound=d.kept_bound)
    params = [x.requires_grad_(True)] + list(fast.experts.parameters())
    results = []
    for decision in (junk, clean):
        y = LocalDispatcher(4).run(x, decision, fast.experts)
        results.append((y, torch.autograd.grad((y * up).sum(), params)))
    (y_junk, g_junk), (y_clean, g_clean) = results
    torch.testing.assert_close(y_junk, y_clean, rtol=0, atol=0)
    for a, b in zip(g_junk, g_clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows, on purpose
@pytest.mark.parametrize("impl", ["triton", "grouped"])
def test_capacity_padding_rows_never_reach_a_token(impl):
    """The padding rows are computed by the last expert; when that expert overflows (inf), a
    token whose slot was dropped must still get exactly the output of its kept slots (not
    inf * 0 = NaN from its padding row), as with exactly counted rows."""
    fast = _layer(impl, capacity_factor=0.75, top_k=2, experts=4, seed=3)
    with torch.no_grad():
        fast.router.weight[0] += 1.0
        fast.experts.first_weight[-1].fill_(1e30)
        fast.experts.down_proj[-1].fill_(1e30)
    exact = _layer(impl, capacity_factor=0.75, top_k=2, experts=4, dispatcher=AllToAllDispatcher(4, None))
    exact.load_state_dict(fast.state_dict())
    x = torch.randn(40, 16, device=DEVICE) + 0.5
    with torch.no_grad():
        res = fast.compute(x)
        out_exact = exact.compute(x).out
    ids = res.decision.expert_ids_TK
    clean = ~(ids == 3).any(1)  # tokens the overflowing expert does not serve
    assert bool(((ids < 0).any(1) & clean).any())  # some of them lost a slot: they own padding rows
    assert torch.isfinite(res.out[clean]).all()
    torch.testing.assert_close(res.out[clean], out_exact[clean], rtol=1e-5, atol=1e-5)


def _padding_case(ids_TK, *, kept_bound, bias=True, dtype=torch.float32, seed=0):
    """A bank of E experts, x, and a top-k decision with dropped slots (-1) and a kept bound."""
    from megamoe.experts import ExpertBank
    from megamoe.routing.base import RoutingDecision
    from megamoe.routing.capacity import counts_per_expert

    torch.manual_seed(seed)
    num_experts = int(ids_TK.max()) + 1 if ids_TK.numel() and int(ids_TK.max()) >= 0 else 3
    bank = ExpertBank(ExpertConfig(intermediate_size=24, activation="swiglu", bias=bias, impl="loop"),
                      hidden_size=16, num_experts=num_experts)
    if bias:
        with torch.no_grad():
            bank.first_bias.normal_()
            bank.down_proj_bias.normal_()
    bank = bank.to(device=DEVICE, dtype=dtype)
    ids_TK = ids_TK.to(DEVICE)
    w_TK = (torch.rand(ids_TK.shape, device=DEVICE) * (ids_TK >= 0)).requires_grad_(True)
    decision = RoutingDecision(expert_ids_TK=ids_TK, weights_TK=w_TK,
                               tokens_per_expert_E=counts_per_expert(ids_TK, num_experts), kept_bound=kept_bound)
    x = torch.randn(ids_TK.shape[0], 16, device=DEVICE, dtype=dtype)
    return bank, decision, x


def _rows_and_grads(dispatcher, bank, decision, x, impl):
    x = x.detach().clone().requires_grad_(True)
    y = dispatcher.run_rows(x, decision, bank, impl=impl)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(device=y.device, dtype=y.dtype)
    params = [x, decision.weights_TK] + list(bank.parameters())
    return y, torch.autograd.grad((y.float() * up.float()).sum(), params, allow_unused=True)


PADDING_CASES = {  # ids_TK (-1: dropped), kept_bound
    "some_dropped": (torch.tensor([[0, 1], [2, -1], [-1, -1], [1, 0], [2, 1], [-1, 0]]), 9),
    "all_dropped": (torch.full((5, 2), -1), 6),
    "one_expert_top1": (torch.tensor([[0], [-1], [0], [-1]]), 3),
    "kept_equals_bound": (torch.tensor([[0, 1], [2, -1], [1, 2]]), 5),
    "bound_above_TK": (torch.tensor([[0, -1], [2, 1]]), 12),
    "empty_batch": (torch.zeros(0, 2, dtype=torch.long), 0),
}


@pytest.mark.parametrize("impl", ["loop", "grouped", "triton"])
@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_padded_rows_equal_counted_rows_at_the_edges(impl, case):
    """Padding to the kept bound changes no output or gradient (router weights included) at
    the edges: nothing kept, one expert with top-1, no padding, the bound above T*K, no
    tokens; biased experts, and the loop path through run_rows (what CUDA runs)."""
    from megamoe.dispatch.local import LocalDispatcher

    ids_TK, bound = PADDING_CASES[case]
    bank, decision, x = _padding_case(ids_TK, kept_bound=bound)
    num_experts = bank.num_experts
    y, g = _rows_and_grads(LocalDispatcher(num_experts), bank, decision, x, impl)
    y_exact, g_exact = _rows_and_grads(AllToAllDispatcher(num_experts, None), bank, decision, x, impl)
    torch.testing.assert_close(y, y_exact, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_exact):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "grouped", "triton"])
def test_padding_rows_keep_gradients_finite_when_a_dropped_token_overflows(impl):
    """A token whose slots were all dropped is computed by no expert with counted rows, but a
    padding row would carry it into the last expert, which never chose it. If that overflows,
    its zero weight times inf must not turn the expert's gradients NaN: padding rows enter
    the experts as zeros."""
    from megamoe.dispatch.local import LocalDispatcher

    bank, decision, x = _padding_case(torch.tensor([[0, 1], [1, 2], [-1, -1], [2, 0]]), kept_bound=8, bias=False)
    x[2] = 1e25
    y, g = _rows_and_grads(LocalDispatcher(3), bank, decision, x, impl)
    y_exact, g_exact = _rows_and_grads(AllToAllDispatcher(3, None), bank, decision, x, impl)
    torch.testing.assert_close(y, y_exact, rtol=1e-5, atol=1e-5)
    names = ["x", "weights_TK"] + [n for n, _ in bank.named_parameters()]
    for name, a, b in zip(names, g, g_exact):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_local_unpermute_has_zeros_in_dropped_slots():
    """Dispatcher.unpermute promises zeros in empty slots; a padding row sits at a dropped
    slot and holds whatever the experts made of it (here the biases), so it must be zeroed."""
    from megamoe.dispatch.local import LocalDispatcher

    bank, decision, x = _padding_case(PADDING_CASES["some_dropped"][0], kept_bound=9)
    dispatcher = LocalDispatcher(bank.num_experts)
    x_RD, handle = dispatcher.dispatch(x, decision)
    assert handle.slots.valid_R is not None and not bool(handle.slots.valid_R.all())
    y_TKD = dispatcher.unpermute(bank(x_RD, handle.tokens_per_local_expert_E, impl="grouped"), handle)
    dropped_TK = decision.expert_ids_TK < 0
    assert torch.equal(y_TKD[dropped_TK], torch.zeros_like(y_TKD[dropped_TK]))
