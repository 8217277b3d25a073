"""Expert Choice: exact capacity, score weights, a dense reference, the LP cap, causal safety."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from megamoe import ConfigError, ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.routing import RoutingContext, build_router
from megamoe.routing.expert_choice import capped_assignment_lp
from megamoe.testing import assert_prefix_unchanged


def ec_layer(num_experts=4, hidden=8, inter=16, capacity_factor=2.0, causal=False, **options):
    cfg = MoEConfig(hidden_size=hidden, num_experts=num_experts, experts=ExpertConfig(intermediate_size=inter),
                    router=RouterConfig(name="expert_choice", options={"capacity_factor": capacity_factor, **options}))
    return MoELayer(cfg, causal=causal)


def dense_expert_choice(layer, x_TD, capacity_factor):
    """Direct dense reference: a loop over experts, each sorting all tokens by its score."""
    scores = torch.softmax(x_TD @ layer.router.weight.t(), dim=-1)
    plain = scores.detach()
    num_tokens, num_experts = scores.shape
    k = min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))
    out = torch.zeros_like(x_TD)
    chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for e in range(num_experts):
        order = sorted(range(num_tokens), key=lambda t: -float(plain[t, e]))[:k]
        for t in order:
            chosen[t, e] = True
            out[t] = out[t] + scores[t, e] * layer.experts.expert_forward(x_TD[t:t + 1], e)[0]
    return out, chosen, scores


@pytest.mark.parametrize("capacity_factor,num_tokens", [(2.0, 24), (1.0, 10), (0.5, 16), (3.0, 7)])
def test_each_expert_takes_exactly_its_capacity(capacity_factor, num_tokens):
    layer = ec_layer(capacity_factor=capacity_factor)
    d = layer.compute(torch.randn(num_tokens, 8)).decision
    k = min(num_tokens, math.ceil(num_tokens * capacity_factor / 4))
    assert d.tokens_per_expert_E.tolist() == [k] * 4
    ids = d.expert_ids_TK
    # No token holds the same expert twice; the kept count matches the slots.
    for row in ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))
    assert int((ids >= 0).sum()) == 4 * k


def test_weights_are_router_scores_and_output_matches_dense_reference():
    layer = ec_layer(capacity_factor=2.0)
    x = torch.randn(20, 8, requires_grad=True)
    res = layer.compute(x)
    ref_out, chosen, scores = dense_expert_choice(layer, x, 2.0)
    d = res.decision
    valid = d.expert_ids_TK >= 0
    torch.testing.assert_close(d.weights_TK[valid], scores.gather(1, d.expert_ids_TK.clamp_min(0))[valid])
    assert torch.all(d.weights_TK[~valid] == 0)
    got = torch.zeros_like(chosen)
    got[torch.arange(20)[:, None].expand_as(valid)[valid], d.expert_ids_TK[valid]] = True
    assert torch.equal(got, chosen)
    torch.testing.assert_close(res.out, ref_out)
    # Gradients (router included: the combine weights are the scores) agree too.
    g_moe = torch.autograd.grad(res.out.square().sum(), [x, layer.router.weight, layer.experts.down_proj])
    g_ref = torch.autograd.grad(ref_out.square().sum(), [x, layer.router.weight, layer.experts.down_proj])
    for a, b in zip(g_moe, g_ref):
        torch.testing.assert_close(a, b)


def test_experts_per_token_statistics():
    layer = ec_layer(capacity_factor=1.0)
    x = torch.randn(32, 8)
    res = layer.compute(x)
    per_token = (res.decision.expert_ids_TK >= 0).sum(1)
    hist = res.stats.extra["experts_per_token_hist"]
    expected = torch.bincount(per_token, minlength=5).float() / 32
    torch.testing.assert_close(hist, expected)
    assert float(res.stats.extra["zero_expert_fraction"]) == pytest.approx(float((per_token == 0).float().mean()))
    assert float(res.stats.extra["mean_experts_per_token"]) == pytest.approx(1.0)
    assert float(res.stats.max_vio) == 0.0


def test_lp_matches_exact_linear_program_and_respects_constraints():
    torch.manual_seed(1)
    num_tokens, num_experts, cap, b = 12, 4, 5, 2
    scores = torch.softmax(torch.randn(num_tokens, num_experts) * 2, dim=-1)
    log_a = capped_assignment_lp(scores, capacity=cap, max_per_token=b, entropy=1e-2, iterations=2000)
    a = log_a.exp()
    assert torch.all(a <= 1 + 1e-9)
    torch.testing.assert_close(a.sum(0), torch.full((num_experts,), float(cap), dtype=a.dtype), atol=1e-3, rtol=0)
    assert float(a.sum(1).max()) <= b + 1e-3
    # The exact LP (no entropy) optimum, from scipy's HiGHS; the regularised value is within
    # the entropy term's reach of it (lam * max entropy = lam * T * E * log 2 bounds the gap).
    s = scores.double().numpy()
    a_eq = np.kron(np.ones((1, num_tokens)), np.eye(num_experts))        # expert sums (x is row-major [T, E])
    a_ub = np.kron(np.eye(num_tokens), np.ones((1, num_experts)))        # token sums
    lp = linprog(-s.reshape(-1), A_ub=a_ub, b_ub=np.full(num_tokens, b), A_eq=a_eq,
                 b_eq=np.full(num_experts, cap), bounds=(0, 1), method="highs")
    assert lp.status == 0
    gap = -lp.fun - float((scores.double() * a).sum())
    assert -1e-3 <= gap <= 1e-2 * num_tokens * num_experts * math.log(2) + 1e-3


def chosen_mask(decision, num_experts):
    ids = decision.expert_ids_TK
    mask = torch.zeros(ids.shape[0], num_experts, dtype=torch.bool)
    valid = ids >= 0
    mask[torch.arange(ids.shape[0])[:, None].expand_as(ids)[valid], ids[valid]] = True
    return mask


@pytest.mark.parametrize("solver", ["exact", "dykstra"])
def test_cap_holds_exactly_and_every_expert_gets_its_capacity(solver):
    torch.manual_seed(3)
    x = torch.randn(64, 8) * 3
    plain = ec_layer(capacity_factor=2.0)
    capped = ec_layer(capacity_factor=2.0, max_experts_per_token=2, lp_solver=solver)
    capped.load_state_dict(plain.state_dict())
    over_plain = ((plain.compute(x).decision.expert_ids_TK >= 0).sum(1) > 2).float().mean()
    assert over_plain > 0.1  # without the cap many tokens get 3-4 experts
    res = capped.compute(x)
    per_token = (res.decision.expert_ids_TK >= 0).sum(1)
    assert int(per_token.max()) <= 2
    assert float(res.stats.extra["over_cap_fraction"]) == 0.0
    assert res.decision.tokens_per_expert_E.tolist() == [32] * 4  # E*k = 128 = T*b: feasible
    assert float(res.stats.extra["lp_seconds"]) > 0
    if solver == "dykstra":
        assert 1 <= float(res.stats.extra["lp_iterations"]) <= 100


def test_exact_cap_is_the_optimum_of_the_integral_problem_by_brute_force():
    """6 tokens, 3 experts, c=2 (k=4), b=2: every token must take exactly 2 experts (E*k = T*b).
    Token 0 is every expert's favourite, so plain EC gives it 3 experts."""
    router = build_router(RouterConfig(name="expert_choice", options={"max_experts_per_token": 2,
                                                                      "capacity_factor": 2.0}),
                          hidden_size=3, num_experts=3)
    plain = build_router(RouterConfig(name="expert_choice", options={"capacity_factor": 2.0}), hidden_size=3,
                         num_experts=3)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
        plain.weight.copy_(torch.eye(3))
    x = torch.tensor([[3.0, 3.0, 3.0], [2.0, 0.1, 0.3], [0.2, 1.5, 0.1], [0.1, 0.4, 1.9], [1.0, 1.1, 0.0],
                      [0.0, 0.5, 0.7]])
    scores = torch.softmax(x, -1).double()
    assert int(chosen_mask(plain(x), 3)[0].sum()) == 3
    got = chosen_mask(router(x), 3)
    feasible = []
    pairs = [(0, 1), (0, 2), (1, 2)]
    for choice in np.ndindex(*(3,) * 6):
        m = torch.zeros(6, 3, dtype=torch.bool)
        for t, c in enumerate(choice):
            m[t, list(pairs[c])] = True
        if m.sum(0).tolist() == [4, 4, 4]:
            feasible.append((float((scores * m).sum()), m))
    feasible.sort(key=lambda vm: -vm[0])
    assert feasible[0][0] - feasible[1][0] > 1e-6  # a unique optimum, so the comparison is exact
    assert torch.equal(got, feasible[0][1])


def test_infeasible_exact_loads_fill_as_many_slots_as_the_cap_allows():
    # T=7, E=4, c=2: k=4 per expert (16 pairs) but b=2 allows only 14.
    layer = ec_layer(capacity_factor=2.0, max_experts_per_token=2)
    res = layer.compute(torch.randn(7, 8))
    per_token = (res.decision.expert_ids_TK >= 0).sum(1)
    assert per_token.tolist() == [2] * 7
    assert int(res.decision.tokens_per_expert_E.max()) <= 4
    assert int(res.decision.tokens_per_expert_E.sum()) == 14


def test_dykstra_stops_at_its_tolerance():
    torch.manual_seed(1)
    scores = torch.softmax(torch.randn(12, 4) * 2, dim=-1)
    info: dict = {}
    capped_assignment_lp(scores, capacity=5, max_per_token=2, entropy=1e-2, iterations=2000, tolerance=1e-3,
                         info=info)
    assert info["violation"] <= 1e-3 and 10 <= info["iterations"] < 2000
    capped_assignment_lp(scores, capacity=5, max_per_token=2, entropy=1e-2, iterations=2000, tolerance=1e-9,
                         info=info)
    assert info["iterations"] > 10  # a tighter tolerance takes more sweeps


def test_causal_model_refuses_plain_expert_choice():
    layer = ec_layer(causal=True)
    with pytest.raises(ValueError, match="causal_mode: prefix"):
        layer(torch.randn(2, 5, 8))


def test_prefix_mode_is_causal_prefix_routing_bit_identical():
    layer = ec_layer(causal=True, causal_mode="prefix", capacity_factor=2.0)
    x = torch.randn(3, 16, 8)
    out = layer(x)
    ctx = RoutingContext(causal=True, sequence_length=16)
    d = layer.router(x.reshape(-1, 8), ctx)
    for t in (5, 11, 15):
        x2 = x.clone()
        x2[:, t] = torch.randn(3, 8) * 5
        out2 = layer(x2)
        assert_prefix_unchanged(out[:, :t], out2[:, :t], f"outputs before position {t}")
        d2 = layer.router(x2.reshape(-1, 8), ctx)
        early = (torch.arange(48) % 16 < t)
        for name in ("expert_ids_TK", "weights_TK"):
            a, b = getattr(d, name)[early], getattr(d2, name)[early]
            assert torch.equal(a, b), f"{name} before position {t} changed"
    # Sequences do not affect each other either.
    x3 = x.clone()
    x3[0] = torch.randn(16, 8)
    assert_prefix_unchanged(layer(x3)[1:], out[1:], "other sequences")


def test_plain_expert_choice_leaks_the_future_so_the_causal_check_can_fail():
    layer = ec_layer(causal=False, capacity_factor=1.0)
    x = torch.randn(1, 32, 8)
    out = layer(x)
    x2 = x.clone()
    x2[:, 31] = x2[:, :31].mean(1) * 50  # a late token that outbids earlier ones
    with pytest.raises(AssertionError):
        assert_prefix_unchanged(layer(x2)[:, :31], out[:, :31], "plain expert choice")


def test_prefix_mode_selection_rule_and_average_load():
    router = build_router(RouterConfig(name="expert_choice", options={"causal_mode": "prefix", "capacity_factor": 1.0}),
                          hidden_size=4, num_experts=4)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.randn(8 * 64, 4)
    d = router(x, RoutingContext(causal=True, sequence_length=64))
    scores = torch.softmax(x, -1).view(8, 64, 4)
    mask = torch.zeros(8 * 64, 4, dtype=torch.bool)
    valid = d.expert_ids_TK >= 0
    mask[torch.arange(8 * 64)[:, None].expand_as(valid)[valid], d.expert_ids_TK[valid]] = True
    mask = mask.view(8, 64, 4)
    for n, t, e in [(0, 0, 0), (1, 10, 2), (7, 63, 3), (4, 31, 1)]:
        prefix = scores[n, :t + 1, e]
        rank = int((prefix[:t] >= prefix[t]).sum())
        assert bool(mask[n, t, e]) == (rank < (t + 1) * 1.0 / 4)
    # Every expert still gets about c/E of the tokens.
    load = d.tokens_per_expert_E.float() / (8 * 64)
    assert torch.all((load - 0.25).abs() < 0.08)


def test_bad_options_fail_at_build_with_field_names():
    with pytest.raises(ConfigError, match="causal_mode"):
        ec_layer(causal_mode="future")
    with pytest.raises(ConfigError, match="max_experts_per_token"):
        ec_layer(capacity_factor=2.0, max_experts_per_token=1)
    with pytest.raises(ConfigError, match="did you mean 'lp_entropy'"):
        ec_layer(lp_entropie=0.1)


@pytest.mark.parametrize("options", [{}, {"causal_mode": "prefix"}, {"max_experts_per_token": 3}])
def test_empty_and_tiny_batches(options):
    layer = ec_layer(**options)
    for num_tokens in (0, 1, 3):
        x = torch.randn(num_tokens, 8, requires_grad=True)
        out = layer(x)
        out.square().sum().backward()
        assert out.shape == (num_tokens, 8)
        k = min(num_tokens, math.ceil(num_tokens * 2 / 4))
        loads = layer.last_stats.tokens_per_expert_E
        if "max_experts_per_token" in options:  # T=1: the cap (3) leaves room for 3 of the 4 experts
            assert int(loads.max()) <= k and int(loads.sum()) == min(4 * k, 3 * num_tokens)
        else:
            assert loads.tolist() == [k] * 4 or options.get("causal_mode") == "prefix"
