"""The skip and balanced estimators are unbiased; biased top-k with capacity is not.

Each test builds a problem small enough to solve exactly (closed form for skip, a 1-D
numerical integral for balanced), takes the Monte-Carlo mean of the estimator's gradient
over every parameter (router and experts), and checks it against the exact gradient of the
expected loss within a statistical bound. The same check rejects plain top-k with capacity.
"""
import dataclasses
import math

import pytest
import torch
from scipy import integrate

from megamoe import ConfigError, ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.train.objectives import estimator_loss
from megamoe.routing.estimators import gumbel_assignment

Z_BOUND = 4.5        # per-coordinate z-score; ~80 coordinates -> false alarm ~ 5e-4
REL_SLACK = 1e-6     # plus float64 / quadrature noise, relative to the largest exact coordinate


def small_layer(name, num_experts=2, hidden=3, inter=4, sharpness=3.0, **router_kw):
    router_kw.setdefault("top_k", 1)
    router_kw.setdefault("aux_loss_coef", 0.0)
    cfg = MoEConfig(hidden_size=hidden, num_experts=num_experts,
                    experts=ExpertConfig(intermediate_size=inter, activation="gelu"),
                    router=RouterConfig(name=name, **router_kw))
    layer = MoELayer(cfg).double()
    with torch.no_grad():  # a router sharp enough that p(e|x) is far from uniform
        layer.router.weight.mul_(sharpness)
    return layer


def params(layer):
    return [layer.router.weight, layer.experts.up_proj, layer.experts.down_proj]


def flat_grad(loss, ps):
    gs = torch.autograd.grad(loss, ps, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, ps)])


def token_loss(out_TD, y_TD):
    return (out_TD - y_TD).square().sum(-1)


def per_expert_losses(layer, x, y):
    """l[t, e]: loss of token t when expert e processes it (graph to the experts)."""
    y_ETD = layer.experts.forward_all(x)
    return (y_ETD - y[None]).square().sum(-1).t()


def exact_skip_gradient(layer, x, y):
    """L = sum_t E_{e ~ p(.|x_t)} l_t(e): the MoE loss with no capacity, in closed form."""
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    return flat_grad((probs * per_expert_losses(layer, x, y)).sum(), params(layer))


def mc_gradients(layer, x, y, n, use_estimator=True, tamper=None):
    """n gradient samples; ``tamper`` edits the router's pending record (negative controls)."""
    layer.train()
    out = []
    for _ in range(n):
        o = layer(x)
        if tamper is not None:
            layer.router.pending = tamper(layer.router.pending)
        loss = estimator_loss(layer, token_loss(o, y), reduction="sum") if use_estimator else token_loss(o, y).sum()
        out.append(flat_grad(loss, params(layer)))
    return torch.stack(out)


def within_statistical_bound(samples, exact):
    mean, sem = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    slack = Z_BOUND * sem + REL_SLACK * exact.abs().max()
    return bool(torch.all((mean - exact).abs() <= slack)), float(((mean - exact).abs() / (sem + 1e-12)).max())


def test_skip_estimator_is_unbiased_under_heavy_capacity_skipping():
    layer = small_layer("skip", options={"capacity_factor": 0.5})  # C = 1 slot per expert for 4 tokens
    x, y = torch.randn(4, 3, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    exact = exact_skip_gradient(layer, x, y)
    samples = mc_gradients(layer, x, y, n=1500)
    ok, zmax = within_statistical_bound(samples, exact)
    assert ok, f"skip estimator biased: max z {zmax:.1f}"
    # The problem does skip tokens, so the Horvitz-Thompson weights matter.
    layer(x)
    assert float(layer.last_stats.extra["skipped_fraction"]) > 0 or float(layer.last_stats.extra["max_ht_weight"]) > 1


def test_skip_without_horvitz_thompson_weights_fails_the_check():
    layer = small_layer("skip", options={"capacity_factor": 0.5})
    x, y = torch.randn(4, 3, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    exact = exact_skip_gradient(layer, x, y)
    unweighted = lambda rec: dataclasses.replace(rec, loss_weight_T=(rec.loss_weight_T > 0).float())  # noqa: E731
    assert not within_statistical_bound(mc_gradients(layer, x, y, n=500, tamper=unweighted), exact)[0]


def test_biased_topk_with_capacity_fails_the_same_check():
    layer = small_layer("topk", options={"capacity_factor": 0.5, "normalize_weights": True})
    skip = small_layer("skip", options={"capacity_factor": 0.5})
    skip.load_state_dict(layer.state_dict(), strict=False)
    x, y = torch.randn(4, 3, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    exact = exact_skip_gradient(skip, x, y)
    samples = mc_gradients(layer, x, y, n=20, use_estimator=False)
    ok, _ = within_statistical_bound(samples, exact)
    assert not ok


def logistic_sum_probability(delta):
    """P(L1 + L2 > -delta) and its derivative for independent standard logistics."""
    pdf = lambda u: math.exp(-abs(u)) / (1 + math.exp(-abs(u))) ** 2  # noqa: E731
    cdf = lambda u: 1 / (1 + math.exp(-u))  # noqa: E731
    p = integrate.quad(lambda u: pdf(u) * cdf(delta + u), -60, 60, epsabs=1e-12)[0]
    dp = integrate.quad(lambda u: pdf(u) * pdf(delta + u), -60, 60, epsabs=1e-12)[0]
    return p, dp


def exact_balanced_objective(layer, x, y):
    """E over the Gumbel-matching draw of sum_t l_t, for pairs of tokens and 2 experts (1 slot each).

    A pair is matched straight (t0->e0, t1->e1) iff (G00 - G01) + (G11 - G10) > -delta with
    delta = lp00 + lp11 - lp01 - lp10; Gumbel differences are logistic, so P is a 1-D integral.
    Returns a surrogate whose value is the expectation and whose gradient is its exact gradient.
    """
    logp = torch.log_softmax(x @ layer.router.weight.t(), dim=-1)
    losses = per_expert_losses(layer, x, y)
    total = 0.0
    for s in range(0, x.shape[0], 2):
        lp, lo = logp[s:s + 2], losses[s:s + 2]
        delta = lp[0, 0] + lp[1, 1] - lp[0, 1] - lp[1, 0]
        p, dp = logistic_sum_probability(float(delta.detach()))
        straight, crossed = lo[0, 0] + lo[1, 1], lo[0, 1] + lo[1, 0]
        total = total + p * straight + (1 - p) * crossed + (straight - crossed).detach() * dp * delta
    return total


def test_probability_integral_matches_simulation():
    torch.manual_seed(3)
    delta = 0.7
    g = -torch.log(-torch.log(torch.rand(200_000, 4, dtype=torch.double)))
    straight = (g[:, 0] - g[:, 1]) + (g[:, 3] - g[:, 2]) > -delta
    p, _ = logistic_sum_probability(delta)
    assert abs(float(straight.double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / 200_000)


def test_balanced_estimator_is_unbiased_on_one_group():
    layer = small_layer("balanced")
    x, y = torch.randn(2, 3, dtype=torch.double), torch.randn(2, 3, dtype=torch.double)
    exact = flat_grad(exact_balanced_objective(layer, x, y), params(layer))
    samples = mc_gradients(layer, x, y, n=1500)
    ok, zmax = within_statistical_bound(samples, exact)
    assert ok, f"balanced estimator biased: max z {zmax:.1f}"
    biased = mc_gradients(small_layer_from(layer, "topk", options={"capacity_factor": 1.0}), x, y, n=20,
                          use_estimator=False)
    assert not within_statistical_bound(biased, exact)[0]


def test_balanced_estimator_is_unbiased_over_many_groups():
    """256 independent groups per call (group_size=2) give the check enough power to see
    the cross-token terms: crediting each token with only its own loss fails it."""
    replicas = 256
    layer = small_layer("balanced", sharpness=1.0, options={"group_size": 2})
    x, y = torch.randn(2, 3, dtype=torch.double), torch.randn(2, 3, dtype=torch.double)
    exact = flat_grad(exact_balanced_objective(layer, x, y), params(layer))
    xs, ys = x.repeat(replicas, 1), y.repeat(replicas, 1)
    samples = mc_gradients(layer, xs, ys, n=150) / replicas
    ok, zmax = within_statistical_bound(samples, exact)
    assert ok, f"balanced estimator biased: max z {zmax:.1f}"
    own_loss_only = lambda rec: dataclasses.replace(rec, credit="token")  # noqa: E731
    assert not within_statistical_bound(mc_gradients(layer, xs, ys, n=150, tamper=own_loss_only) / replicas,
                                        exact)[0]


def small_layer_from(layer, name, **router_kw):
    other = small_layer(name, **router_kw)
    other.load_state_dict(layer.state_dict(), strict=False)
    return other


def test_balanced_assignment_is_exactly_balanced_and_optimal():
    import itertools
    torch.manual_seed(2)
    logp = torch.log_softmax(torch.randn(12, 3), -1)
    g = -torch.log(-torch.log(torch.rand(12, 3, 4, dtype=torch.double)))
    assert torch.bincount(gumbel_assignment(logp, g), minlength=3).tolist() == [4, 4, 4]
    # Optimality against brute force: 6 tokens, 3 experts x 2 slots, all 720 matchings.
    logp, g = logp[:6], g[:6, :, :2]
    ids = gumbel_assignment(logp, g)
    z = (logp.double()[:, :, None] + g).reshape(6, 6)
    values = {perm: sum(float(z[t, s]) for t, s in enumerate(perm)) for perm in itertools.permutations(range(6))}
    best = max(values.values())
    consistent = max(v for perm, v in values.items() if all(s // 2 == int(ids[t]) for t, s in enumerate(perm)))
    assert consistent == pytest.approx(best, abs=1e-12)


def test_estimator_routers_train_and_eval_paths():
    layer = small_layer("skip", options={"capacity_factor": 1.0})
    x = torch.randn(16, 3, dtype=torch.double)
    layer.eval()
    d = layer.compute(x).decision
    assert torch.equal(d.expert_ids_TK[:, 0], (x @ layer.router.weight.t()).argmax(-1))
    assert layer.router.pending is None
    with pytest.raises(ValueError, match="no pending routing samples"):
        estimator_loss(layer, torch.zeros(16))
    layer.train()
    out = layer(x)
    with pytest.raises(ValueError, match="per-token loss"):
        estimator_loss(layer, out.sum())
    record = layer.router.pending
    per_token = token_loss(out, torch.zeros_like(out))
    loss = estimator_loss(layer, per_token)
    assert layer.router.pending is None and int(layer.router.baseline_steps) == 1
    # The value is the Horvitz-Thompson loss estimate; the score-function term adds 0.
    expected = (record.loss_weight_T.double() * per_token.detach()).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert float(layer.router.baseline_value) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_bad_estimator_configs_fail_at_build():
    with pytest.raises(ConfigError, match="top_k: 1"):
        small_layer("skip", top_k=2)
    with pytest.raises(ConfigError, match="score_func: softmax"):
        small_layer("balanced", options={"score_func": "sigmoid"})
    with pytest.raises(ConfigError, match="group_size"):
        small_layer("balanced", options={"group_size": 0})
    with pytest.raises(ConfigError, match="eval_mode"):
        small_layer("skip", options={"eval_mode": "greedy"})


def test_estimators_refuse_causal_training_when_tokens_are_coupled():
    x = torch.randn(2, 4, 3, dtype=torch.double)
    for name, kw in [("balanced", {}), ("skip", {"options": {"capacity_factor": 1.0}})]:
        layer = small_layer(name, **kw)
        layer.causal = True
        with pytest.raises(ValueError, match="not causal"):
            layer(x)
        layer.eval()
        layer(x)  # eval routing is per token
    dropless = small_layer("skip")
    dropless.causal = True
    dropless(x)


def test_seed_estimator_draws_is_reproducible_per_rank_and_independent_of_global_rng():
    from megamoe.routing.estimators import seed_estimator_draws
    x = torch.randn(64, 3, dtype=torch.double)

    def draws(name, seed, rank, **kw):
        layer = small_layer(name, sharpness=0.0, **kw)  # uniform p(e|x): every draw is pure noise
        torch.manual_seed(1000 + rank)  # the global RNG must not matter once seeded
        assert seed_estimator_draws(layer, seed, rank=rank) == 1
        ids = [layer.compute(x).decision.expert_ids_TK[:, 0] for _ in range(2)]
        layer.router.pending = None
        return torch.cat(ids)

    for name, kw in [("skip", {"options": {"capacity_factor": 0.5}}), ("balanced", {"options": {"group_size": 8}})]:
        a = draws(name, 7, 0, **kw)
        assert torch.equal(a, draws(name, 7, 0, **kw))
        assert not torch.equal(a[:64], a[64:])      # the generator advances between calls
        assert not torch.equal(a, draws(name, 7, 1, **kw))   # other rank, other draws
        assert not torch.equal(a, draws(name, 8, 0, **kw))   # other seed, other draws
    layer = small_layer("skip", options={"capacity_factor": 0.5})
    seed_estimator_draws(layer, 3, rank=0)
    seed_estimator_draws(layer, None)               # back to the global RNG
    torch.manual_seed(5)
    first = layer.compute(x).decision.expert_ids_TK
    torch.manual_seed(5)
    assert torch.equal(first, layer.compute(x).decision.expert_ids_TK)
