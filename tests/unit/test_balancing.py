"""ALF-LB (megamoe.routing.balancing, run by megamoe.train.step_state.MoEStepState) in one process:
formulas, counting, hooks, checkpoints.

The multi-process equivalence tests are in tests/distributed/test_balancing_dist.py.
"""
import math

import pytest
import torch
import torch.utils.checkpoint as ckpt
from torch import nn

from megamoe import ConfigError, ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.routing.balancing import AuxFreeBalancingConfig, bias_delta, step_size
from megamoe.stats import evaluate_max_vio, max_vio
from megamoe.train.step_state import MoEStepState
from megamoe.routing.base import counts_per_expert

DIM, EXPERTS, TOP_K = 8, 4, 2


def moe_cfg(score_func="softmax", top_k=TOP_K, experts=EXPERTS):
    return MoEConfig(hidden_size=DIM, num_experts=experts, experts=ExpertConfig(intermediate_size=16),
                     router=RouterConfig(top_k=top_k, aux_loss_coef=0.0, options={"score_func": score_func}))


class Net(nn.Module):
    """Token-wise: input projection, two MoE layers, classifier."""

    def __init__(self, score_func="softmax", checkpointed=None):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.moe1 = MoELayer(moe_cfg(score_func), layer_index=0)
        self.moe2 = MoELayer(moe_cfg(score_func), layer_index=1)
        self.out = nn.Linear(DIM, 3)
        self.checkpointed = checkpointed  # None, "reentrant" or "non_reentrant"

    def body(self, h):
        h = h + self.moe1(h)
        return h + self.moe2(h)

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointed:
            h = ckpt.checkpoint(self.body, h, use_reentrant=self.checkpointed == "reentrant")
        else:
            h = self.body(h)
        return self.out(h)


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def route_counts(model, x):
    """Selected slots per expert of each MoE layer for input x, computed directly (in eval mode,
    so a balancer's counters do not see these calls)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        h = model.inp(x)
        c1 = model.moe1.router(h).selected_counts_E
        h = h + model.moe1(h)
        c2 = model.moe2.router(h).selected_counts_E
    model.train(was_training)
    return [c1, c2]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [({"update": "signum"}, "update"), ({"schedule": "cosine"}, "schedule"),
                                       ({"step_size": 0}, "step_size"), ({"step_size": -1e-3}, "step_size"),
                                       ({"step_size": float("nan")}, "step_size"), ({"center": "yes"}, "center")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"AuxFreeBalancingConfig.{field}="):
        AuxFreeBalancingConfig(**kw)


def test_config_from_dict_rejects_unknown_key():
    assert AuxFreeBalancingConfig.from_dict({"update": "linear"}).update == "linear"
    with pytest.raises(ConfigError, match="did you mean 'step_size'"):
        AuxFreeBalancingConfig.from_dict({"stepsize": 1e-3})


def test_every_router_gets_a_bias_when_they_also_have_an_aux_loss():
    model = Net()
    for moe in (model.moe1, model.moe2):  # as in the train job's configs: an aux loss besides ALF-LB
        moe.router = moe.router.__class__(RouterConfig(top_k=TOP_K, aux_loss_coef=0.01), hidden_size=DIM,
                                          num_experts=EXPERTS)
    with pytest.warns(UserWarning, match="aux_loss_coef") as record:
        bal = MoEStepState(model, balancing=AuxFreeBalancingConfig())
    assert len(record) == 1 and all(b is not None for b in bal.balancer.biases().values())
    model(torch.randn(8, DIM))
    assert bal.end_step().metrics["alflb/slots"] == 8 * TOP_K and bal.balancer.num_updates == 1


def test_no_balanceable_router_is_an_error():
    with pytest.raises(ValueError, match="enable_selection_bias"):
        MoEStepState(nn.Linear(2, 2), balancing=AuxFreeBalancingConfig())


# --------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("schedule, expected", [("constant", lambda u, n: u), ("inv_sqrt", lambda u,
                                                                               n: u / math.sqrt(n)),
                                                ("inv", lambda u, n: u / n)])
def test_schedules_match_their_formulas(schedule, expected):
    cfg = AuxFreeBalancingConfig(step_size=0.3, schedule=schedule)
    for n in range(1, 8):
        assert step_size(cfg, n) == pytest.approx(expected(0.3, n), rel=1e-12)
    with pytest.raises(ValueError):
        step_size(cfg, 0)


def test_sign_and_linear_deltas():
    c = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6, e = [-4, 4, 0, 0]
    sign = bias_delta(c, AuxFreeBalancingConfig("sign", 0.01, "inv"), 4)
    torch.testing.assert_close(sign, torch.tensor([-0.0025, 0.0025, 0.0, 0.0]))
    lin = bias_delta(c, AuxFreeBalancingConfig("linear", 0.5, "inv_sqrt"), 4)
    torch.testing.assert_close(lin, torch.tensor([-0.5 / 2 * 4 / 6, 0.5 / 2 * 4 / 6, 0.0, 0.0]))
    assert torch.equal(bias_delta(torch.zeros(4), AuxFreeBalancingConfig(), 1), torch.zeros(4))
    # Both rules are invariant to a common scale of the counts (replicated tokens in the group).
    cfg = AuxFreeBalancingConfig("linear", 0.1)
    torch.testing.assert_close(bias_delta(c, cfg, 1), bias_delta(3 * c, cfg, 1))


def test_max_vio():
    assert max_vio(torch.tensor([2, 2, 2, 2])).item() == 0.0
    assert max_vio(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(3.0)
    assert max_vio(torch.zeros(3)).item() == 0.0
    torch.testing.assert_close(max_vio(torch.tensor([[1.0, 3.0], [2.0, 2.0]])),
                               torch.tensor([0.5, 0.0], dtype=torch.float64))


# --------------------------------------------------------------------------- counting
@pytest.mark.parametrize("checkpointed", [None, "reentrant", "non_reentrant"])
def test_counts_each_token_once_under_activation_checkpointing(checkpointed):
    model = Net(checkpointed=checkpointed)
    bal = MoEStepState(model, balancing=AuxFreeBalancingConfig())
    x, y = torch.randn(24, DIM), torch.randint(3, (24,))
    loss_fn(model, x, y).backward()  # checkpointed bodies recompute in backward: must not count again
    expected = route_counts(model, x)
    pending = bal.pending_counts()
    for got, want in zip(pending.values(), expected):
        assert torch.equal(got, want.double())
    assert float(sum(c.sum() for c in pending.values())) == 2 * 24 * TOP_K


def test_eval_and_paused_forwards_are_not_counted():
    model = Net()
    bal = MoEStepState(model, balancing=AuxFreeBalancingConfig())
    x = torch.randn(10, DIM)
    model.eval()
    model(x)
    model.train()
    with bal.paused():
        model(x)
    assert all(float(c.sum()) == 0 for c in bal.pending_counts().values())
    assert bal.end_step().metrics == {"alflb/slots": 0.0} and bal.balancer.num_updates == 0


def test_gradient_accumulation_counts_every_micro_batch():
    torch.manual_seed(1)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bal = MoEStepState(model, balancing=AuxFreeBalancingConfig("linear", 0.1))
    bal.attach_to_optimizer(opt)
    micro = [(torch.randn(16, DIM), torch.randint(3, (16,))) for _ in range(3)]
    bias_before = [b.clone() for b in bal.balancer.biases().values()]
    expected = [sum(cs) for cs in zip(*(route_counts(model, x) for x, _ in micro))]
    for x, y in micro:
        (loss_fn(model, x, y) / len(micro)).backward()
    assert bal.balancer.num_updates == 0  # backward alone never updates
    opt.step()
    assert bal.balancer.num_updates == 1 and bal.last_metrics["alflb/slots"] == 3 * 16 * TOP_K
    for before, after, c in zip(bias_before, bal.balancer.biases().values(), expected):
        torch.testing.assert_close(after, before + bias_delta(c, bal.balancer.config, 1))
        assert max_vio(c).item() == pytest.approx(bal.last_metrics[f"alflb/max_vio_batch/{'moe1' if c is expected[0] else 'moe2'}.router"])


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_never_receives_a_gradient(score_func):
    model = Net(score_func)
    bal = MoEStepState(model, balancing=AuxFreeBalancingConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal.attach_to_optimizer(opt)
    biases = list(bal.balancer.biases().values())
    assert not any(b is p for b in biases for p in model.parameters())
    for b in biases:
        b.add_(torch.linspace(-0.2, 0.2, EXPERTS))  # non-zero, so it does steer selection
    x, y = torch.randn(32, DIM), torch.randint(3, (32,))
    loss_fn(model, x, y).backward()
    assert all(b.grad is None and not b.requires_grad for b in biases)
    # Even a bias that asks for a gradient gets none: there is no autograd path from it.
    for b in biases:
        b.requires_grad_(True)
    grads = torch.autograd.grad(loss_fn(model, x, y), biases, allow_unused=True)
    assert all(g is None for g in grads)
    for b in biases:
        b.requires_grad_(False)
    snapshot = [b.clone() for b in biases]
    opt.step()  # changes only by the ALF-LB update, not by the optimizer
    for before, after in zip(snapshot, biases):
        delta = after - before
        assert torch.all(delta.abs() <= bal.balancer.config.step_size + 1e-6)  # fp32 rounding of b + u


@pytest.mark.parametrize("update, u, schedule, top_k", [("sign", 0.05, "inv_sqrt", 1), ("sign", 0.02, "constant", 2),
                                                       ("linear", 0.3, "inv_sqrt", 2)])
def test_selection_moves_tokens_from_overloaded_to_underloaded(update, u, schedule, top_k):
    """Han & Zhong's preference rule on a constructed, heavily skewed router: a token leaves
    expert i for expert j only if b_j rose more than b_i (so c_j < c_i), and repeated updates
    drive the violation down."""
    torch.manual_seed(3)
    cfg = moe_cfg("sigmoid", top_k=top_k)
    layer = MoELayer(cfg)
    x = torch.randn(256, DIM)
    with torch.no_grad():
        x[:, 0] = 1.0
        layer.router.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, -1.0])  # expert 0 >> 1 >> 2 >> 3
    bal = MoEStepState(layer, balancing=AuxFreeBalancingConfig(update, u, schedule))
    ids = layer.router(x).expert_ids_TK
    first_vio = max_vio(counts_per_expert(ids, EXPERTS)).item()
    assert first_vio > 0.9
    moved = 0
    for _ in range(120):
        layer(x)
        counts = counts_per_expert(ids, EXPERTS)
        before = layer.router.expert_bias.clone()
        bal.end_step()
        delta = layer.router.expert_bias - before
        new_ids = layer.router(x).expert_ids_TK
        for t in torch.nonzero((torch.sort(ids).values != torch.sort(new_ids).values).any(1)).flatten().tolist():
            left = set(ids[t].tolist()) - set(new_ids[t].tolist())
            joined = set(new_ids[t].tolist()) - set(ids[t].tolist())
            for i in left:
                for j in joined:
                    assert delta[j] > delta[i] and counts[j] < counts[i], (t, i, j)
            moved += 1
        ids = new_ids
    final_vio = max_vio(counts_per_expert(ids, EXPERTS)).item()
    assert moved > 0
    # Constant steps end in a small oscillation, decaying ones converge; both cut it 4x.
    assert final_vio < 0.25 * first_vio, (first_vio, final_vio)


def test_centering_keeps_mean_bias_zero_and_selection_unchanged():
    layer = MoELayer(moe_cfg())
    x = torch.randn(64, DIM)
    twin = MoELayer(moe_cfg())
    plain = MoEStepState(layer, balancing=AuxFreeBalancingConfig("linear", 0.05))
    centred = MoEStepState(twin, balancing=AuxFreeBalancingConfig("linear", 0.05, center=True))
    twin.load_state_dict(layer.state_dict())
    for _ in range(5):
        layer(x), twin(x)  # noqa: B018
        plain.end_step(), centred.end_step()
        assert abs(twin.router.expert_bias.mean().item()) < 1e-6
        assert torch.equal(layer.router(x).expert_ids_TK, twin.router(x).expert_ids_TK)


# ---------------------------------------------------------------------- checkpoints
def _train(model, bal, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(32, DIM), torch.randint(3, (32,))) for _ in range(6)]
    cfg = AuxFreeBalancingConfig("sign", 0.01, "inv_sqrt")
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bal = MoEStepState(model, balancing=cfg)
    bal.attach_to_optimizer(opt)
    _train(model, bal, opt, batches[:3])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "alflb": bal.state_dict()}, path)
    _train(model, bal, opt, batches[3:])

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = Net()
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    bal2 = MoEStepState(resumed, balancing=cfg)  # creates the bias buffers the checkpoint fills
    bal2.attach_to_optimizer(opt2)
    state = torch.load(path)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    bal2.load_state_dict(state["alflb"])
    assert bal2.balancer.num_updates == 3 and any(b.abs().sum() > 0 for b in bal2.balancer.biases().values())
    _train(resumed, bal2, opt2, batches[3:])
    assert bal2.balancer.num_updates == bal.balancer.num_updates == 6
    for a, b in zip(bal.balancer.biases().values(), bal2.balancer.biases().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="covers layers"):
        bal2.load_state_dict({"num_updates": 1, "layer_names": ["other.router"]})


# ------------------------------------------------------------------------- held-out
def test_evaluate_max_vio_matches_direct_counts_and_leaves_training_state():
    model = Net()
    bal = MoEStepState(model, balancing=AuxFreeBalancingConfig())
    for b in bal.balancer.biases().values():
        b.copy_(torch.tensor([0.3, -0.1, 0.0, 0.05]))
    held = [torch.randn(20, DIM) for _ in range(3)]
    got = evaluate_max_vio(model, held)
    per_layer = [sum(cs) for cs in zip(*(route_counts(model, x) for x in held))]
    assert got["max_vio_global/moe1.router"] == pytest.approx(max_vio(per_layer[0]).item())
    assert got["max_vio_global/moe2.router"] == pytest.approx(max_vio(per_layer[1]).item())
    assert got["max_vio_global"] == pytest.approx((max_vio(per_layer[0]) + max_vio(per_layer[1])).item() / 2)
    assert model.training and all(float(c.sum()) == 0 for c in bal.pending_counts().values())


# ------------------------------------------------------------------------ HF Trainer
class _HFNet(Net):
    def forward(self, inputs, labels=None):
        logits = super().forward(inputs)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def test_hf_trainer_callback_updates_once_per_optimizer_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from megamoe.integrations.hf import MoETrainerCallback

    torch.manual_seed(0)
    x, y = torch.randn(8, DIM), torch.randint(3, (8,))
    model = _HFNet()
    reference = _HFNet()
    reference.load_state_dict(model.state_dict())
    cfg = AuxFreeBalancingConfig("linear", 0.2)
    callback = MoETrainerCallback(balancing=cfg)
    # lr 0 keeps the weights fixed and batch*accumulation covers the data set, so each
    # optimizer step sees exactly the full data set whatever order the sampler picks.
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             num_train_epochs=3, learning_rate=0.0, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(x, y), callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 3 and callback.step_state.balancer.num_updates == 3
    assert callback.step_state.balancer.last_metrics["alflb/slots"] == 8 * TOP_K
    assert any("alflb/max_vio_batch" in k for k in trainer.state.log_history[-2])

    manual = MoEStepState(reference, balancing=cfg)
    for _ in range(3):
        reference(x, y)
        manual.end_step()
    for a, b in zip(callback.step_state.balancer.biases().values(), manual.balancer.biases().values()):
        torch.testing.assert_close(a, b)


def test_counts_selected_slots_before_capacity_drops():
    """Balancing controls the load routers ask for; with a capacity factor the dropped slots
    are still counted (otherwise an overloaded expert would look only 'full')."""
    cfg = MoEConfig(hidden_size=DIM, num_experts=EXPERTS, experts=ExpertConfig(intermediate_size=16),
                    router=RouterConfig(top_k=TOP_K, aux_loss_coef=0.0, options={"capacity_factor": 0.5}))
    layer = MoELayer(cfg)
    bal = MoEStepState(layer, balancing=AuxFreeBalancingConfig())
    x = torch.randn(40, DIM)
    out = layer.compute(x)
    assert out.decision.tokens_per_expert_E.sum() < 40 * TOP_K  # some slots were dropped
    (counts,) = bal.pending_counts().values()
    assert torch.equal(counts, out.decision.selected_per_expert_E.double())
    assert float(counts.sum()) == 40 * TOP_K
