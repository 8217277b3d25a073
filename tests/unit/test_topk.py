"""Token-choice top-k routing: selection, weights, capacity drops and losses by hand."""
import math

import pytest
import torch

from megamoe import RouterConfig
from megamoe.routing import RoutingContext, build_router
from megamoe.testing import assert_prefix_unchanged
from megamoe.routing.capacity import apply_capacity, expert_capacity
from megamoe.routing.losses import attach_aux_loss, load_balancing_loss, z_loss


def make_router(num_experts=4, hidden=4, **kw):
    kw.setdefault("aux_loss_coef", 0.0)
    r = build_router(RouterConfig(**kw), hidden_size=hidden, num_experts=num_experts)
    return r


def set_logits(router, logits_TE):
    """Make x W^T == logits by using x = logits and W = I (hidden == num_experts)."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts))
    return logits_TE.clone()


def test_softmax_topk_selection_and_renormalised_weights():
    r = make_router(top_k=2)
    x = set_logits(r, torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.1, 0.0, 5.0]]))
    d = r(x)
    probs = torch.softmax(x, -1)
    assert d.expert_ids_TK.tolist() == [[1, 2], [3, 0]]
    top = probs.gather(1, d.expert_ids_TK)
    torch.testing.assert_close(d.weights_TK, top / top.sum(-1, keepdim=True))
    assert d.tokens_per_expert_E.tolist() == [1, 1, 1, 1]


def test_unnormalised_weights_are_the_scores():
    r = make_router(top_k=2, options={"normalize_weights": False})
    x = set_logits(r, torch.randn(5, 4))
    d = r(x)
    torch.testing.assert_close(d.weights_TK, torch.softmax(x, -1).gather(1, d.expert_ids_TK))


def test_sigmoid_scores():
    r = make_router(top_k=1, options={"score_func": "sigmoid", "normalize_weights": False})
    x = set_logits(r, torch.tensor([[0.5, -1.0, 2.0, 0.0]]))
    d = r(x)
    assert d.expert_ids_TK.tolist() == [[2]]
    torch.testing.assert_close(d.weights_TK, torch.sigmoid(torch.tensor([[2.0]])))


def test_router_is_fp32_under_autocast():
    r = make_router(num_experts=4, hidden=8, top_k=2)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = r(x)
    assert d.weights_TK.dtype == torch.float32
    ref = torch.softmax(x.float() @ r.weight.float().t(), -1)
    top = ref.gather(1, d.expert_ids_TK)
    torch.testing.assert_close(d.weights_TK, top / top.sum(-1, keepdim=True))


def test_capacity_formula():
    assert expert_capacity(10, num_experts=4, top_k=2, capacity_factor=1.0) == 5
    assert expert_capacity(10, num_experts=4, top_k=1, capacity_factor=1.25) == math.ceil(10 / 4 * 1.25)


def test_drop_policy_probs_keeps_highest_scores():
    ids = torch.tensor([[0], [0], [0], [1]])
    scores = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    keep = apply_capacity(ids, scores, num_experts=2, capacity=2, policy="probs")
    assert keep.flatten().tolist() == [False, True, True, True]


def test_drop_policy_position_keeps_earliest():
    ids = torch.tensor([[0], [0], [0], [1]])
    scores = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    keep = apply_capacity(ids, scores, num_experts=2, capacity=2, policy="position")
    assert keep.flatten().tolist() == [True, True, False, True]


def test_drop_with_top2_by_hand():
    # 4 tokens, 3 experts, K=2, capacity 2: expert 0 is chosen by all four tokens.
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2]])
    scores = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.5, 0.5]])
    keep = apply_capacity(ids, scores, num_experts=3, capacity=2, policy="probs")
    assert keep.tolist() == [[False, True], [True, True], [True, True], [False, True]]
    keep = apply_capacity(ids, scores, num_experts=3, capacity=2, policy="position")
    assert keep.tolist() == [[True, True], [True, True], [False, True], [False, True]]


def test_router_capacity_marks_dropped_slots():
    r = make_router(top_k=1, options={"capacity_factor": 1.0})  # T=4, E=4 -> C=1
    x = set_logits(r, torch.tensor([[5.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1.0]]))
    d = r(x)
    assert d.expert_ids_TK.flatten().tolist() == [0, -1, 1, 3]
    assert d.weights_TK[1].item() == 0.0
    assert d.tokens_per_expert_E.tolist() == [1, 1, 0, 1]
    assert d.selected_per_expert_E.tolist() == [2, 1, 0, 1]


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    counts = torch.tensor([1, 1, 0])  # top-1 picks 0 and 1
    # f = [0.5, 0.5, 0], P = [0.4, 0.4, 0.2] -> 3 * (0.2 + 0.2) = 1.2
    assert load_balancing_loss(probs, counts, top_k=1).item() == pytest.approx(1.2)
    counts2 = torch.tensor([2, 2, 0])  # top-2 picks {0,1} twice: f = 2/4 each
    assert load_balancing_loss(probs, counts2, top_k=2).item() == pytest.approx(1.2)


def test_uniform_router_balance_loss_is_one():
    probs = torch.full((8, 4), 0.25)
    assert load_balancing_loss(probs, torch.tensor([4, 4, 4, 4]), top_k=2).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e ** 2)]
    assert z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_router_aux_is_coefficient_times_losses():
    r = make_router(top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = set_logits(r, torch.randn(16, 4))
    d = r(x)
    probs = torch.softmax(x, -1)
    expected = 0.01 * load_balancing_loss(probs, d.selected_per_expert_E, top_k=2) + 0.001 * z_loss(x)
    torch.testing.assert_close(d.aux_loss, expected)


def test_aux_loss_gradient_reaches_router_through_attached_output():
    r = make_router(top_k=2, aux_loss_coef=1.0)
    x = torch.randn(10, 4)
    d = r(x)
    out = torch.zeros(10, 3, requires_grad=True)
    attach_aux_loss(out, d.aux_loss, grad_scale=0.5).sum().backward()
    g_attached = r.weight.grad.clone()
    r.weight.grad = None
    (0.5 * r(x).aux_loss).backward()
    torch.testing.assert_close(g_attached, r.weight.grad)
    torch.testing.assert_close(out.grad, torch.ones(10, 3))


def test_jitter_only_in_training():
    r = make_router(top_k=2, jitter_eps=0.5, options={"normalize_weights": False})
    x = torch.randn(64, 4)
    r.eval()
    a, b = r(x).weights_TK, r(x).weights_TK
    torch.testing.assert_close(a, b)
    r.train()
    assert not torch.equal(r(x).weights_TK, r(x).weights_TK)


def test_selection_bias_changes_choice_not_weights():
    r = make_router(top_k=1, options={"normalize_weights": False})
    x = set_logits(r, torch.tensor([[2.0, 1.0, 0.0, 0.0]]))
    r.enable_selection_bias().copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    d = r(x)
    assert d.expert_ids_TK.item() == 1
    torch.testing.assert_close(d.weights_TK, torch.softmax(x, -1)[:, 1:2])
    assert "expert_bias" in r.state_dict()


# ------------------------------------------------------------------ eval capacity, causality
def test_eval_capacity_factor_none_number_and_dropless():
    x_logits = torch.tensor([[5.0, 0, 0, 0], [4.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]])
    # T=4, E=4, top-1: capacity_factor 1.0 -> C=1, 2.0 -> C=2; three tokens want expert 0.
    cases = [(None, [0, -1, -1, 3]), (2.0, [0, 0, -1, 3]), ("dropless", [0, 0, 0, 3])]
    for eval_cf, eval_ids in cases:
        r = make_router(top_k=1, options={"capacity_factor": 1.0, "eval_capacity_factor": eval_cf})
        x = set_logits(r, x_logits)
        assert r(x).expert_ids_TK.flatten().tolist() == [0, -1, -1, 3]  # training: C=1 always
        r.eval()
        d = r(x)
        assert d.expert_ids_TK.flatten().tolist() == eval_ids, eval_cf
        assert d.tokens_per_expert_E.sum() == sum(i >= 0 for i in eval_ids)
    # Dropless training, capacity in eval only.
    r = make_router(top_k=1, options={"eval_capacity_factor": 1.0})
    x = set_logits(r, x_logits)
    assert r(x).expert_ids_TK.flatten().tolist() == [0, 0, 0, 3]
    assert r.eval()(x).expert_ids_TK.flatten().tolist() == [0, -1, -1, 3]


@pytest.mark.parametrize("value", [0, -1.0, "none", True, [1.0]])
def test_bad_eval_capacity_factor_names_the_field(value):
    from megamoe import ConfigError
    with pytest.raises(ConfigError, match="eval_capacity_factor"):
        RouterConfig(options={"eval_capacity_factor": value})


@pytest.mark.parametrize("name", ["expert_choice", "skip", "balanced", "stochastic"])
def test_routers_without_eval_capacity_refuse_it(name):
    from megamoe import ConfigError
    with pytest.raises(ConfigError, match=rf"eval_capacity_factor='dropless' is invalid for router '{name}'"):
        build_router(RouterConfig(name=name, top_k=1, options={"eval_capacity_factor": "dropless"}), hidden_size=4,
                     num_experts=4)


def capacity_layer(policy, capacity_factor=0.75):
    from megamoe import ExpertConfig, MoEConfig, MoELayer
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, num_experts=4, experts=ExpertConfig(intermediate_size=16),
                    router=RouterConfig(top_k=2, aux_loss_coef=0.0,
                                        options={"capacity_factor": capacity_factor, "drop_policy": policy}))
    return MoELayer(cfg, causal=True)


def test_position_drops_are_causal_within_a_sequence():
    """[B, S] flattened row-major: a token's drop never depends on later tokens of its sequence.
    C = 48 of 64 slots per expert: drops happen inside sequence 1 (many experts over-full)."""
    layer = capacity_layer("position")
    x = torch.randn(2, 64, 8)
    out = layer(x)
    assert 0.1 < float(layer.last_stats.dropped_fraction) < 0.5
    for t in (10, 30, 45, 63):
        x2 = x.clone()
        x2[1, t] = x[1, :t].mean(0) * 50  # a late token that outbids every earlier one
        out2 = layer(x2)
        # Routing (with its drops) is bit-identical; outputs equal up to BLAS rounding (see the helper).
        early = torch.cat([torch.ones(64, dtype=torch.bool), torch.arange(64) < t])
        ids, ids2 = (layer.router(v.reshape(-1, 8), RoutingContext(causal=True)).expert_ids_TK for v in (x, x2))
        assert torch.equal(ids[early], ids2[early]), f"routing before position {t} changed"
        assert_prefix_unchanged(out2[1, :t], out[1, :t], f"outputs before position {t}")
        assert_prefix_unchanged(out2[0], out[0], "an earlier sequence")


def test_probs_drops_leak_later_tokens_so_the_causal_check_can_fail():
    layer = capacity_layer("probs")
    x = torch.randn(2, 64, 8)
    out = layer(x)
    x2 = x.clone()
    x2[1, 63] = x[1, :63].mean(0) * 50
    with pytest.raises(AssertionError):
        assert_prefix_unchanged(layer(x2)[1, :63], out[1, :63])
