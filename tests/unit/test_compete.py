"""CompeteSMoE router: competition selection, detached router loss, schedule statistics."""
import math

import pytest
import torch
import torch.nn.functional as F

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.config import ConfigError
from megamoe.routing import build_router
from megamoe.routing.compete import CompeteOptions, CompetitionSchedule
from megamoe.train.step_state import MoEStepState


def make_layer(*, options=None, top_k=2, num_experts=4, hidden=8, activation="gelu", layer_index=0):
    opts = {"compete_prob": 1.0, **(options or {})}
    cfg = MoEConfig(hidden_size=hidden, num_experts=num_experts,
                    experts=ExpertConfig(intermediate_size=16, activation=activation),
                    router=RouterConfig(name="compete", top_k=top_k, aux_loss_coef=0.0, options=opts))
    return MoELayer(cfg, layer_index=layer_index)


@pytest.mark.parametrize("kind", ["softplus_mean", "l2_norm"])
def test_competition_selects_the_highest_affinity_experts(kind):
    layer = make_layer(options={"affinity": kind}, top_k=2, num_experts=6)
    x = torch.randn(20, 8)
    out = layer.compute(x)
    assert float(out.stats.extra["competition"]) == 1.0
    with torch.no_grad():
        y_ETD = torch.stack([layer.experts.expert_forward(x, e) for e in range(6)])
        a_TE = (F.softplus(y_ETD).mean(-1) if kind == "softplus_mean" else y_ETD.norm(dim=-1)).t()
    ids = out.decision.expert_ids_TK
    # Every chosen expert's affinity beats every unchosen one's, token by token.
    chosen = torch.zeros_like(a_TE, dtype=torch.bool).scatter(1, ids, True)
    min_chosen = a_TE.masked_fill(~chosen, math.inf).min(-1).values
    max_other = a_TE.masked_fill(chosen, -math.inf).max(-1).values
    assert bool((min_chosen > max_other).all())
    top = a_TE.gather(1, ids)
    torch.testing.assert_close(out.decision.weights_TK, top / top.sum(-1, keepdim=True))
    # The layer's output is the affinity-weighted mixture of the winners.
    ref = (out.decision.weights_TK[..., None] * y_ETD.transpose(0, 1).gather(
        1, ids[..., None].expand(-1, -1, 8))).sum(1)
    torch.testing.assert_close(out.out, ref, rtol=1e-5, atol=1e-6)


def test_router_loss_has_no_gradient_into_the_experts_but_trains_the_router():
    layer = make_layer(options={"winners_coef": 0.5})
    x = torch.randn(16, 8)
    out = layer.compute(x)
    expert_params = list(layer.experts.parameters())
    grads = torch.autograd.grad(out.aux_loss, expert_params + [layer.router.weight], allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads[:-1])
    assert grads[-1] is not None and float(grads[-1].abs().max()) > 0
    # The experts do learn through the competition output.
    g_out = torch.autograd.grad(out.out.square().sum(), expert_params)
    assert all(float(g.abs().max()) > 0 for g in g_out)


def test_router_loss_matches_mse_to_competition_softmax():
    layer = make_layer(options={"mse_coef": 0.3})
    x = torch.randn(10, 8)
    out = layer.compute(x)
    with torch.no_grad():
        y_ETD = torch.stack([layer.experts.expert_forward(x, e) for e in range(4)])
        target = torch.softmax(F.softplus(y_ETD).mean(-1).t(), -1)
        pred = torch.softmax(x @ layer.router.weight.t(), -1)
    torch.testing.assert_close(out.aux_loss.detach(), 0.3 * ((pred - target) ** 2).mean())


def test_non_competition_steps_are_plain_topk_and_eval_does_not_compete():
    layer = make_layer(options={"compete_prob": 0.0}, top_k=2)
    x = torch.randn(12, 8)
    d = layer.compute(x).decision
    probs = torch.softmax(x @ layer.router.weight.detach().t(), -1)
    assert torch.equal(d.expert_ids_TK.sort(-1).values, probs.topk(2, -1).indices.sort(-1).values)
    layer2 = make_layer()
    layer2.eval()
    assert float(layer2.compute(x).stats.extra["competition"]) == 0.0


def test_schedule_rate_warmup_layer_cap_and_reproducibility():
    opts = CompeteOptions(warmup_steps=100, compete_prob=0.2, num_layers=6, max_compete_layers=2, seed=3)
    sched = CompetitionSchedule(opts)
    steps = range(0, 5100)
    assert not any(sched.step_competes(s) for s in range(100))
    hits = sum(sched.step_competes(s) for s in range(100, 5100))
    # Binomial(5000, 0.2): sd = 28; a 5-sigma band.
    assert abs(hits - 1000) < 140
    layer_hits = [0] * 6
    for s in steps:
        active = [i for i in range(6) if sched.competes(s, i)]
        assert len(active) in (0, 2)
        assert (len(active) == 2) == sched.step_competes(s)
        for i in active:
            layer_hits[i] += 1
    # Each layer competes on about p * 2/6 of post-warm-up steps: Binomial sd ~ 18.
    for h in layer_hits:
        assert abs(h - 5000 * 0.2 / 3) < 90
    again = CompetitionSchedule(CompeteOptions(**{**opts.__dict__}))
    assert [again.competing_layers(s) for s in steps] == [sched.competing_layers(s) for s in steps]
    other = CompetitionSchedule(CompeteOptions(**{**opts.__dict__, "seed": 4}))
    assert [other.competing_layers(s) for s in steps] != [sched.competing_layers(s) for s in steps]


def test_layer_follows_schedule_through_its_step_attribute():
    layer = make_layer(options={"compete_prob": 0.5, "seed": 1, "num_layers": 3, "max_compete_layers": 1},
                       layer_index=2)
    sched = layer.router.schedule
    x = torch.randn(4, 8)
    state = MoEStepState(layer)  # the training side's per-step state tells the layer the step
    for step in range(12):
        state.begin_step(step)
        flag = float(layer.compute(x).stats.extra["competition"])
        assert flag == float(sched.competes(step, 2))


def test_options_are_validated():
    with pytest.raises(ConfigError, match="compete_prob"):
        build_router(RouterConfig(name="compete", options={"compete_prob": 1.5}), hidden_size=4, num_experts=4)
    with pytest.raises(ConfigError, match="num_layers"):
        build_router(RouterConfig(name="compete", options={"max_compete_layers": 2}), hidden_size=4,
                     num_experts=4)
    with pytest.raises(ConfigError, match="affinity"):
        build_router(RouterConfig(name="compete", options={"affinity": "l1"}), hidden_size=4, num_experts=4)
    with pytest.raises(ConfigError, match="did you mean 'compete_prob'"):
        build_router(RouterConfig(name="compete", options={"compete_pro": 0.1}), hidden_size=4, num_experts=4)
    layer = make_layer(options={"num_layers": 2}, layer_index=5)
    with pytest.raises(ValueError, match="layer_index=5"):
        layer.compute(torch.randn(3, 8))


def test_diversity_term_reaches_experts():
    layer = make_layer(options={"mse_coef": 0.0, "diversity_coef": 1.0})
    out = layer.compute(torch.randn(8, 8))
    grads = torch.autograd.grad(out.aux_loss, list(layer.experts.parameters()))
    assert any(float(g.abs().max()) > 0 for g in grads)
