"""Python API inputs: wrong types, shapes and dtypes are named errors; NaN tokens behave as
documented (megamoe.finite) and the opt-in check names the layer."""
from __future__ import annotations

import pytest
import torch

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.experts import ExpertBank
from megamoe.finite import NonFiniteError, first_nonfinite_grad, first_nonfinite_module, set_finite_checks
from megamoe.routing.base import build_router, known_routers, router_class

H = 8


def _layer(**router) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=H, num_experts=4, experts=ExpertConfig(16), router=RouterConfig(top_k=2, **router))
    return MoELayer(cfg, layer_index=3)


BAD_INPUTS = [
    # (input, error type, message)
    (torch.tensor(1.0), ValueError, r"MoE layer 3 expects inputs with last dimension hidden_size=8 .* got shape \(\)"),
    (torch.randn(4, 7), ValueError, r"hidden_size=8 .* got shape \(4, 7\)"),
    (torch.randn(8), ValueError, None),  # 1-D of width H is one token: accepted (checked below)
    (torch.ones(3, H, dtype=torch.long), ValueError, r"expects floating-point hidden states, got dtype torch\.int64"),
    (torch.ones(3, H, dtype=torch.bool), ValueError, r"floating-point"),
    (torch.randn(3, H, dtype=torch.float64), ValueError,
     r"got torch\.float64 input but its parameters are torch\.float32: cast the input .* or run under torch\.autocast"),
    (torch.randn(3, H, dtype=torch.bfloat16), ValueError, r"got torch\.bfloat16 input but its parameters"),
    (torch.randn(3, H, dtype=torch.float16), ValueError, r"got torch\.float16 input"),
    ([[0.0] * H], TypeError, r"expects a tensor of hidden states \[\.\.\., 8\], got list"),
    (None, TypeError, r"got NoneType"),
    (3.0, TypeError, r"got float"),
]


@pytest.mark.parametrize("x, error, message", BAD_INPUTS,
                         ids=[f"{type(c[0]).__name__}{tuple(getattr(c[0], 'shape', ()))}-{getattr(c[0], 'dtype', '')}"
                              for c in BAD_INPUTS])
def test_bad_layer_input_is_a_named_error(x, error, message):
    layer = _layer()
    if message is None:
        assert layer(x).shape == x.shape
        return
    with pytest.raises(error, match=message):
        layer(x)
    with pytest.raises(error, match=message):
        layer.compute(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_under_autocast_other_dtypes_run_and_keep_the_input_dtype(dtype):
    layer = _layer()
    x = torch.randn(2, 5, H)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_layer_converted_to_the_input_dtype_runs():
    layer = _layer().to(torch.float64)
    assert layer(torch.randn(3, H, dtype=torch.float64)).dtype == torch.float64


CONSTRUCTORS = [
    (lambda: MoELayer({"hidden_size": H, "num_experts": 2}), TypeError,
     r"MoELayer\(config\) needs a megamoe\.MoEConfig, got dict; .*from_dict\(MoEConfig"),
    (lambda: MoELayer(None), TypeError, r"needs a megamoe\.MoEConfig, got NoneType"),
    (lambda: MoELayer(ExpertConfig(8)), TypeError, r"needs a megamoe\.MoEConfig, got ExpertConfig"),
    (lambda: ExpertBank({"intermediate_size": 8}, hidden_size=H, num_experts=2), TypeError,
     r"ExpertBank\(config\) needs a megamoe\.ExpertConfig, got dict"),
    (lambda: ExpertBank(ExpertConfig(8), hidden_size=0, num_experts=2), ValueError,
     r"ExpertBank: hidden_size=0 is invalid: must be an integer >= 1"),
    (lambda: ExpertBank(ExpertConfig(8), hidden_size=8.0, num_experts=2), ValueError, r"hidden_size=8\.0"),
    (lambda: ExpertBank(ExpertConfig(8), hidden_size=H, num_experts=True), ValueError, r"num_experts=True"),
    (lambda: build_router({"name": "topk"}, hidden_size=H, num_experts=2), TypeError,
     r"build_router\(config\) needs a megamoe\.RouterConfig, got dict"),
]
CONSTRUCTORS += [
    (lambda name=name: router_class(RouterConfig(name=name, top_k=1))({"top_k": 1}, hidden_size=H, num_experts=2),
     TypeError, r"\(config\) needs a megamoe\.RouterConfig, got dict")
    for name in known_routers()]
CONSTRUCTORS += [
    (lambda name=name: router_class(RouterConfig(name=name, top_k=1))(RouterConfig(name=name, top_k=1),
                                                                      hidden_size=-1, num_experts=2),
     ValueError, r"hidden_size=-1 is invalid: must be an integer >= 1")
    for name in known_routers()]


@pytest.mark.parametrize("make, error, message", CONSTRUCTORS, ids=range(len(CONSTRUCTORS)))
def test_constructors_with_wrong_types_are_named_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_nan_token_documented_behaviour_and_opt_in_check():
    layer = _layer()
    x = torch.randn(6, H)
    x[2, 1] = float("nan")
    y = layer(x)  # off by default: no host sync, the NaN token's output is NaN, the others are finite
    finite_rows = torch.isfinite(y).all(-1)
    assert not finite_rows[2] and finite_rows[[0, 1, 3, 4, 5]].all()
    assert set_finite_checks(layer) == 1
    with pytest.raises(NonFiniteError, match=r"the input of MoE layer 3 holds 1 NaN/inf value\(s\) of 48 "
                                             r"\(first at index \(2, 1\)"):
        layer(x)
    layer(torch.randn(6, H))  # finite input passes
    with torch.no_grad():
        layer.experts.down_proj[0, 0, 0] = float("inf")  # a broken weight: finite input, non-finite output
    with pytest.raises(NonFiniteError, match=r"the output of MoE layer 3 \(its input was finite\)"):
        layer(torch.randn(64, H))
    set_finite_checks(layer, False)
    layer(x)


def test_finders_name_the_module_and_the_gradient():
    from megamoe.model import ModelConfig, MoETransformerLM
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=16,
                                         moe=MoEConfig(num_experts=4, experts=ExpertConfig(16))))
    ids = torch.randint(0, 32, (2, 8))
    assert first_nonfinite_module(model, lambda: model(ids, labels=ids)) is None

    def poison(module, args, output):
        return output * float("nan")

    handle = model.model.layers[1].mlp.register_forward_hook(poison)
    where = first_nonfinite_module(model, lambda: model(ids, labels=ids))
    assert where == "model.layers.1.mlp (in MoE layer 1)", where
    handle.remove()

    # A finite loss whose backward goes non-finite at the input of layer 1's MoE block: the
    # gradients of everything backward reaches after it (layer 1's attention, layer 0, the
    # embedding) are NaN; the finder names the first of them backward reached.
    def poison_grad(module, grad_input, grad_output):
        return tuple(g * float("nan") if g is not None else None for g in grad_input)

    model.zero_grad()
    handle = model.model.layers[1].mlp.register_full_backward_hook(poison_grad)
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    handle.remove()
    grad = first_nonfinite_grad(model)
    assert grad is not None and grad.startswith("the gradient of model.layers.1.") and ".mlp." not in grad, grad
    assert first_nonfinite_grad(torch.nn.Linear(2, 2)) is None
