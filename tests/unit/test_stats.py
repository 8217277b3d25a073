"""megamoe.stats: finding MoE layers, and every load statistic against a value worked out by hand."""
import math

import pytest
import torch
from torch import nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.stats import (DeadExperts, LoadCounter, LoadReport, bias_routers, dropped_fraction, load_percentiles,
                           load_shares, max_vio, moe_layers, named_moe_layers, routing_entropy)


def layer(name="topk", **router):
    cfg = MoEConfig(hidden_size=8, num_experts=4, experts=ExpertConfig(intermediate_size=8),
                    router=RouterConfig(name=name, **router))
    return MoELayer(cfg)


class Wrapped(nn.Module):
    """An MoE layer inside another module, a dense block, and one that only looks similar."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 8), layer(top_k=2))
        self.b = layer(name="expert_choice", top_k=1)
        self.decoy = nn.Module()
        self.decoy.router = nn.Linear(8, 4)  # a router, but no dispatcher / compute: not an MoE layer


def test_finding_layers_and_bias_routers_in_module_order():
    model = Wrapped()
    assert [n for n, _ in named_moe_layers(model)] == ["a.1", "b"]
    assert moe_layers(model) == [model.a[1], model.b]
    # expert choice takes no selection bias; a bare layer's router is called "router"
    assert [n for n, _ in bias_routers(model)] == ["a.1.router"]
    assert [n for n, _ in bias_routers(model.a[1])] == ["router"]


def test_max_vio_by_hand():
    # mean 3: (6 - 3) / 3 = 1; uniform 0; nothing routed 0; a row at a time for [L, E]
    assert max_vio(torch.tensor([6, 3, 2, 1])).item() == pytest.approx(1.0)
    assert max_vio(torch.tensor([5, 5])).item() == 0.0
    assert max_vio(torch.zeros(4)).item() == 0.0
    assert max_vio(torch.tensor([[6, 3, 2, 1], [0, 0, 0, 4]])).tolist() == pytest.approx([1.0, 3.0])
    assert max_vio(torch.tensor([1, 2])).dtype == torch.float64


def test_load_shares_and_dropped_fraction_by_hand():
    assert load_shares(torch.tensor([6, 3, 2, 1])).tolist() == pytest.approx([0.5, 0.25, 1 / 6, 1 / 12])
    assert load_shares(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    # 12 slots selected, 9 kept: a quarter dropped
    assert dropped_fraction(torch.tensor([3, 3, 2, 1]), torch.tensor([6, 3, 2, 1])).item() == pytest.approx(0.25)
    assert dropped_fraction(torch.zeros(4), torch.zeros(4)).item() == 0.0
    assert dropped_fraction(torch.tensor([[1, 1], [2, 2]]), torch.tensor([[2, 2], [2, 2]])).tolist() == [0.5, 0.0]


def test_routing_entropy_by_hand():
    assert routing_entropy(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(1.0)  # uniform
    assert routing_entropy(torch.tensor([7, 0, 0, 0])).item() == 0.0  # one expert takes all
    # shares [1/2, 1/4, 1/4, 0]: H = 1.5 ln 2, divided by ln 4 = 2 ln 2 -> 0.75
    assert routing_entropy(torch.tensor([2, 1, 1, 0])).item() == pytest.approx(0.75)
    assert routing_entropy(torch.zeros(4)).item() == 0.0
    assert routing_entropy(torch.tensor([3])).item() == 0.0  # one expert: nothing to balance
    h = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4)) / math.log(2)
    assert routing_entropy(torch.tensor([[3, 2], [1, 1]])).tolist() == pytest.approx([h, 1.0])


def test_load_percentiles_by_hand():
    # relative loads c / mean = [0, 1, 1, 2] (mean 2 of [0, 2, 2, 4]); numpy's linear quantiles:
    # q=0.1 -> position 0.3 -> 0.3; q=0.5 -> position 1.5 -> 1; q=0.9 -> position 2.7 -> 1.7
    got = load_percentiles(torch.tensor([4, 0, 2, 2]))
    assert got.tolist() == pytest.approx([0.3, 1.0, 1.7])
    assert load_percentiles(torch.tensor([[4, 0, 2, 2], [1, 1, 1, 1]]), q=(0.0, 1.0)).tolist() == [[0.0, 2.0],
                                                                                                   [1.0, 1.0]]
    assert load_percentiles(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_dead_experts_need_a_whole_window_without_tokens():
    dead = DeadExperts([3, 2], window=2)
    c = lambda *rows: [torch.tensor(r) for r in rows]  # noqa: E731
    assert dead.update(c([0, 1, 1], [1, 0])) == [0, 0]  # one empty step is not yet a window
    assert dead.update(c([0, 1, 1], [0, 3])) == [1, 0]  # expert 0 of layer 0: 2 empty steps
    assert dead.update(c([0, 0, 1], [0, 3])) == [1, 1]  # layer 1's expert 0: 2 empty steps; the others < 2
    assert dead.update(c([5, 1, 0], [1, 0])) == [0, 0]  # a token revives expert 0 (of both layers)
    saved = dead.state_dict()
    again = DeadExperts([3, 2], window=2)
    again.load_state_dict(saved)
    # runs were [0, 0, 1] and [0, 1]: one more empty step kills layer 0's expert 2 and layer 1's expert 1
    assert again.update(c([0, 0, 0], [0, 0])) == dead.update(c([0, 0, 0], [0, 0])) == [1, 1]
    with pytest.raises(ValueError, match="window"):
        DeadExperts([3], window=0)


def test_load_report_collects_the_same_numbers():
    sel = torch.tensor([[6.0, 3.0, 2.0, 1.0], [2.0, 1.0, 1.0, 0.0]])
    kept = torch.tensor([[3.0, 3.0, 2.0, 1.0], [2.0, 1.0, 1.0, 0.0]])
    r = LoadReport.of(sel, kept, dead=[0, 1])
    assert r.max_vio == pytest.approx([1.0, 1.0])
    assert r.dropped_fraction == pytest.approx([0.25, 0.0])
    assert r.routing_entropy[1] == pytest.approx(0.75)
    assert r.shares[0] == pytest.approx([0.5, 0.25, 1 / 6, 1 / 12])
    summary = r.summary()
    assert summary["dropped_fraction"] == pytest.approx(3 / 16)  # over all layers' slots
    assert summary["max_vio"] == pytest.approx(1.0) and summary["dead_experts"] == 1.0


def test_counter_counts_training_forwards_selected_kept_and_aux():
    moe = layer(top_k=2, aux_loss_coef=0.1, options={"capacity_factor": 0.5})
    x = torch.randn(40, 8)
    with LoadCounter([moe.router]) as counter:
        out = moe.compute(x)
        moe.eval()
        moe(x)  # eval mode: not counted
        moe.train()
        selected, kept, aux, calls = counter.take()
    assert torch.equal(selected, out.decision.selected_per_expert_E.double())
    assert torch.equal(kept, out.decision.tokens_per_expert_E.double())
    assert kept.sum() < selected.sum() == 40 * 2
    assert aux.item() == pytest.approx(float(out.aux_loss))
    assert calls == [1]
    assert counter.take()[0].sum() == 0  # take() resets
