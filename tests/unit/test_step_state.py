"""MoEStepState in one process: what it tells the layers, what one step measures, checkpoints.

ALF-LB through the step state is in test_balancing.py; several processes in
tests/distributed/test_balancing_dist.py and test_alflb_ep.py.
"""
import json

import pytest
import torch
from torch import nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.routing.balancing import AuxFreeBalancingConfig
from megamoe.train.step_state import MoEStepState

DIM, EXPERTS = 8, 4


def moe(index, **router):
    cfg = MoEConfig(hidden_size=DIM, num_experts=EXPERTS, experts=ExpertConfig(intermediate_size=16),
                    router=RouterConfig(top_k=2, **router))
    return MoELayer(cfg, layer_index=index)


class Net(nn.Module):
    def __init__(self, **router):
        super().__init__()
        self.moe1, self.moe2 = moe(0, **router), moe(1, **router)

    def forward(self, x):
        return x + self.moe2(x + self.moe1(x))


def test_the_layers_read_the_step_and_the_aux_scale_from_the_state():
    model = Net()
    state = MoEStepState(model, accumulation_steps=4)
    assert all(layer.signals is state.signals for layer in (model.moe1, model.moe2))
    assert state.signals.aux_loss_scale == 0.25
    state.set_loss_scale(1024.0)  # fp16 dynamic loss scaling: the aux gradient is scaled with the loss
    assert state.signals.aux_loss_scale == 256.0
    state.begin_step(7)
    assert model.moe1.routing_context().step == 7
    state.end_step()
    assert model.moe1.routing_context().step == 7  # shown to the routers at the next begin_step
    state.begin_step()
    assert model.moe1.routing_context().step == 8
    with pytest.raises(ValueError, match="accumulation_steps"):
        state.set_accumulation_steps(0)


def test_aux_loss_gradient_is_weighted_by_the_state():
    torch.manual_seed(0)
    a, b = moe(0, aux_loss_coef=0.5), moe(0, aux_loss_coef=0.5)
    b.load_state_dict(a.state_dict())
    MoEStepState(b, accumulation_steps=2)
    x = torch.randn(16, DIM)
    a(x).sum().backward()
    b(x).sum().backward()
    # the output term's gradient is the same, the aux term's halved: compare against a by hand
    a2 = moe(0, aux_loss_coef=0.5)
    a2.load_state_dict(a.state_dict())
    out = a2.compute(x)
    (out.out.sum() + 0.5 * out.aux_loss).backward()
    torch.testing.assert_close(b.router.weight.grad, a2.router.weight.grad)
    assert not torch.allclose(a.router.weight.grad, b.router.weight.grad)


def test_one_step_sums_its_micro_batches_and_reports_the_load():
    torch.manual_seed(1)
    model = Net(aux_loss_coef=0.1)
    state = MoEStepState(model, dead_expert_window=1)
    xs = [torch.randn(10, DIM) for _ in range(3)]
    expected = [torch.zeros(EXPERTS, dtype=torch.int64) for _ in range(2)]
    aux = 0.0
    for x in xs:
        h = model.moe1.compute(x)
        expected[0] += h.decision.selected_per_expert_E
        h2 = model.moe2.compute(x + h.out)
        expected[1] += h2.decision.selected_per_expert_E
        aux += float(h.aux_loss) + float(h2.aux_loss)
    report = state.end_step(extra=[2.5, -1.0])
    assert report.step == 1 and report.extra == [2.5, -1.0]
    assert report.load.selected == [e.double().tolist() for e in expected]
    assert report.aux_loss == pytest.approx(aux / 3)  # summed over layers, mean over micro-batches
    assert report.load.dead_experts == [int((e == 0).sum()) for e in expected]
    assert report.metrics["moe/max_vio"] == pytest.approx(sum(report.load.max_vio) / 2)
    assert "alflb/slots" not in report.metrics  # no balancer
    empty = state.end_step()
    assert empty.load is None and empty.metrics == {} and empty.step == 2


def test_a_step_that_is_not_applied_moves_no_bias_but_is_measured():
    model = Net(aux_loss_coef=0.0)
    state = MoEStepState(model, balancing=AuxFreeBalancingConfig(step_size=0.1))
    x = torch.randn(12, DIM)
    model(x)
    report = state.end_step(apply=False)
    assert state.balancer.num_updates == 0 and all(float(b.abs().max()) == 0 for b in state.balancer.biases().values())
    assert report.load is not None and not any(k.startswith("alflb/") for k in report.metrics)
    model(x)
    assert state.end_step().metrics["alflb/slots"] == 12 * 2 and state.balancer.num_updates == 1


def test_optimizer_hook_ends_and_begins_steps():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = MoEStepState(model)
    state.attach_to_optimizer(opt)
    for _ in range(3):
        model(torch.randn(6, DIM)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert state.step == 3 and model.moe2.routing_context().step == 3
    assert state.last_report.load.selected[0] and sum(state.last_report.load.selected[0]) == 6 * 2
    with pytest.raises(TypeError, match="attach_step_state"):
        state.attach_to_optimizer(object())


def test_state_dict_round_trip_and_a_legacy_balancer_state():
    model = Net(aux_loss_coef=0.0)
    cfg = AuxFreeBalancingConfig()
    state = MoEStepState(model, balancing=cfg, dead_expert_window=2)
    for _ in range(3):
        model(torch.randn(8, DIM))
        state.end_step()
    saved = state.state_dict()
    assert json.loads(json.dumps(saved)) == saved  # stored in megamoe_config.json
    other = MoEStepState(Net(aux_loss_coef=0.0), balancing=cfg, dead_expert_window=2)
    other.load_state_dict(saved)
    assert other.step == 3 and other.balancer.num_updates == 3
    assert other.dead.state_dict() == state.dead.state_dict()
    legacy = MoEStepState(Net(aux_loss_coef=0.0), balancing=cfg)
    legacy.load_state_dict(state.balancer.state_dict())  # a checkpoint's balancer.pt
    assert legacy.balancer.num_updates == 3


def test_a_model_without_moe_layers_is_refused():
    with pytest.raises(ValueError, match="holds no MoE layer"):
        MoEStepState(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="AuxFreeBalancingConfig"):
        MoEStepState(Net(), balancing={"step_size": 0.1})


def test_counts_match_the_routers_decisions_under_capacity():
    layer = moe(0, aux_loss_coef=0.0, options={"capacity_factor": 0.5})
    state = MoEStepState(layer)
    out = layer.compute(torch.randn(20, DIM))
    report = state.end_step()
    assert report.load.selected[0] == out.decision.selected_per_expert_E.double().tolist()
    assert report.load.kept[0] == out.decision.tokens_per_expert_E.double().tolist()
    assert sum(report.load.selected[0]) == 20 * 2 > sum(report.load.kept[0])
    assert report.load.dropped_fraction[0] == pytest.approx(1 - sum(report.load.kept[0]) / 40)
