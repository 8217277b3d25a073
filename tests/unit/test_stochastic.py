"""THOR: uniform random expert usage, the two-pass consistency objective, HF Trainer hook."""
import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
from megamoe.config import ConfigError
from megamoe.routing import build_router
from megamoe.routing.stochastic import seed_draws
from megamoe.train.objectives import ConsistencyObjective, symmetric_kl, thor_loss


def moe_cfg(hidden=8, num_experts=4, **opts):
    return MoEConfig(hidden_size=hidden, num_experts=num_experts,
                     experts=ExpertConfig(intermediate_size=16, activation="gelu"),
                     router=RouterConfig(name="stochastic", top_k=1, options=opts))


class TinyClassifier(nn.Module):
    def __init__(self, num_classes=5, hidden=8, **opts):
        super().__init__()
        self.inp = nn.Linear(6, hidden)
        self.moe = MoELayer(moe_cfg(hidden, **opts))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + self.moe(h))


@pytest.mark.parametrize("granularity", ["batch", "token"])
def test_expert_usage_is_uniform(granularity):
    r = build_router(RouterConfig(name="stochastic", top_k=1, options={"granularity": granularity}),
                     hidden_size=4, num_experts=5)
    counts = torch.zeros(5)
    calls, tokens = (2000, 3) if granularity == "batch" else (20, 500)
    for _ in range(calls):
        d = r(torch.randn(tokens, 4))
        ids = d.expert_ids_TK.flatten()
        if granularity == "batch":
            assert bool((ids == ids[0]).all())  # one expert for the whole call
            counts[ids[0]] += 1
        else:
            counts += torch.bincount(ids, minlength=5)
        assert torch.equal(d.weights_TK, torch.ones(tokens, 1))
    # Fixed seed: deterministic; a biased draw (e.g. never expert 4) gives p ~ 0.
    assert chisquare(counts.numpy()).pvalue > 1e-3


def test_eval_random_per_token_and_ensemble_average():
    layer = MoELayer(moe_cfg(eval_mode="ensemble")).eval()
    x = torch.randn(7, 8)
    with torch.no_grad():
        ref = torch.stack([layer.experts.expert_forward(x, e) for e in range(4)]).mean(0)
        torch.testing.assert_close(layer(x), ref)
    r = build_router(RouterConfig(name="stochastic", top_k=1), hidden_size=8, num_experts=4).eval()
    ids = r(torch.randn(400, 8)).expert_ids_TK.flatten()
    assert len(set(ids.tolist())) == 4


def test_consistency_term_is_zero_when_both_passes_draw_the_same_experts():
    model = TinyClassifier(granularity="token")
    x, y = torch.randn(32, 6), torch.randint(5, (32,))

    def same_draws():
        seed_draws(model, 123)
        return model(x)

    res = thor_loss(same_draws, y, alpha=2.0)
    assert float(res.skl.detach()) == 0.0
    torch.testing.assert_close(res.loss, res.ce1 + res.ce2)
    seed_draws(model, None)
    res2 = thor_loss(lambda: model(x), y, alpha=2.0)
    assert float(res2.skl.detach()) > 1e-6
    torch.testing.assert_close(res2.loss, res2.ce1 + res2.ce2 + 2.0 * res2.skl)


def test_gradients_flow_to_both_passes():
    model = TinyClassifier(granularity="token")
    x, y = torch.randn(16, 6), torch.randint(5, (16,))
    res = thor_loss(lambda: model(x), y, alpha=1.0)
    g1, g2 = torch.autograd.grad(res.skl, [res.logits1, res.logits2], retain_graph=True)
    assert float(g1.abs().max()) > 0 and float(g2.abs().max()) > 0
    # Symmetric: swapping the passes gives the same value.
    torch.testing.assert_close(symmetric_kl(res.logits2, res.logits1), symmetric_kl(res.logits1, res.logits2))
    res.loss.backward()
    used = [e for e in range(4) if model.moe.experts.down_proj.grad[e].abs().max() > 0]
    assert len(used) >= 2


def test_padding_is_ignored_and_causal_shift():
    logits1, logits2 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    labels = torch.randint(3, (2, 5))
    labels[1, 3:] = -100
    res = thor_loss(iter([logits1, logits2]).__next__, labels, alpha=1.0, shift_labels=True)
    keep = labels[:, 1:].reshape(-1) != -100
    l1, l2 = logits1[:, :-1].reshape(-1, 3)[keep], logits2[:, :-1].reshape(-1, 3)[keep]
    p1, p2 = l1.log_softmax(-1), l2.log_softmax(-1)
    expected = 0.5 * ((p1.exp() * (p1 - p2)).sum(-1) + (p2.exp() * (p2 - p1)).sum(-1)).mean()
    torch.testing.assert_close(res.skl, expected)
    with pytest.raises(ValueError, match="shift_labels"):
        thor_loss(iter([logits1, logits2]).__next__, labels[:, 1:], alpha=1.0)


def test_objective_and_hf_trainer_compute_loss():
    transformers = pytest.importorskip("transformers")

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyClassifier()

        def forward(self, x, labels=None):
            assert labels is None  # the objective withholds labels
            return {"logits": self.net(x)}

    model = Wrapped()
    x, y = torch.randn(12, 6), torch.randint(5, (12,))
    res = ConsistencyObjective(alpha=1.5)(model, {"x": x, "labels": y})
    torch.testing.assert_close(res.loss, res.ce1 + res.ce2 + 1.5 * res.skl)

    from megamoe.integrations.hf import ThorTrainerMixin

    class ThorTrainer(ThorTrainerMixin, transformers.Trainer):
        thor_alpha = 1.5

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(output_dir=tmp, per_device_train_batch_size=12, max_steps=3,
                                              learning_rate=1e-2, report_to=[], use_cpu=True,
                                              save_strategy="no", logging_strategy="no")
        ds = [{"x": x[i], "labels": y[i]} for i in range(12)]
        trainer = ThorTrainer(model=model, args=args, train_dataset=ds)
        before = model.net.moe.experts.down_proj.detach().clone()
        out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, model.net.moe.experts.down_proj.detach())


def test_top_k_must_be_one():
    with pytest.raises(ConfigError, match="top_k"):
        build_router(RouterConfig(name="stochastic", top_k=2), hidden_size=4, num_experts=4)
    with pytest.raises(ConfigError, match="granularity"):
        build_router(RouterConfig(name="stochastic", top_k=1, options={"granularity": "layer"}),
                     hidden_size=4, num_experts=4)
