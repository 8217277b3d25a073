"""Single-gated MoE: early exit skips experts, K-means gate init, base-only at threshold 0."""
import pytest
import torch
from torch import nn

from megamoe.research.single_gate import SingleGatedMoE, train_async


def make_model(num_experts=3, feat=4, classes=5, **kw):
    stem = nn.Sequential(nn.Linear(6, feat), nn.Tanh())
    head = nn.Linear(feat, classes)
    return SingleGatedMoE(stem, head, num_experts=num_experts, feature_size=feat, **kw)


class CountRows:
    """A forward hook that counts the rows each expert receives."""

    def __init__(self, model):
        self.rows = [0] * model.num_experts
        for e, m in enumerate(model.experts):
            m.register_forward_hook(lambda mod, inp, out, e=e: self._add(e, inp[0].shape[0]))

    def _add(self, e, n):
        self.rows[e] += n


def test_threshold_zero_is_the_base_alone_and_no_expert_runs():
    model = make_model().eval()
    model.fit_gate(torch.randn(50, 4))
    counter = CountRows(model)
    x = torch.randn(20, 6)
    out = model(x, exit_threshold=0.0)
    assert sum(counter.rows) == 0 and bool(out.exited_N.all()) and out.expert_fraction == 0.0
    torch.testing.assert_close(out.log_probs_NV, torch.log_softmax(model.base_head(model.stem(x)), -1))


@pytest.mark.parametrize("confidence", ["max_prob", "entropy"])
def test_early_exit_skips_expert_compute_above_the_threshold(confidence):
    model = make_model(confidence=confidence).eval()
    with torch.no_grad():
        model.base_head.weight.mul_(8)  # spread the base's confidences
        for ex in model.experts:
            ex.weight.normal_()
    model.fit_gate(torch.randn(60, 4))
    x = torch.randn(200, 6)
    with torch.no_grad():
        _check_exit(model, x, confidence)


def _check_exit(model, x, confidence):
    base_logits = model.base_head(model.stem(x))
    p = torch.softmax(base_logits, -1)
    conf = p.max(-1).values if confidence == "max_prob" else \
        1 + (p * p.log()).sum(-1) / torch.log(torch.tensor(5.0))
    thr = float(conf.median())
    counter = CountRows(model)
    out = model(x, exit_threshold=thr)
    confident = conf >= thr
    assert torch.equal(out.exited_N, confident)
    assert sum(counter.rows) == int((~confident).sum()) and 0 < sum(counter.rows) < 200
    # Exited samples are the base; the others ensemble base and their gate's expert.
    base_logp = torch.log_softmax(base_logits, -1)
    torch.testing.assert_close(out.log_probs_NV[confident], base_logp[confident])
    rest = (~confident).nonzero().flatten()
    h = model.stem(x)
    for i in rest[:10].tolist():
        e = int(out.expert_ids_N[i])
        pe = torch.softmax(model.experts[e](h[i:i + 1]), -1)[0]
        expected = torch.log(0.5 * p[i] + 0.5 * pe)
        torch.testing.assert_close(out.log_probs_NV[i], expected, rtol=1e-5, atol=1e-6)
    # Threshold None never exits.
    assert not bool(model(x, exit_threshold=None).exited_N.any())


def test_kmeans_init_assigns_samples_to_their_nearest_centroid():
    centers = torch.tensor([[8.0, 0, 0, 0], [0, 8.0, 0, 0], [0, 0, 8.0, 0]])
    blob = torch.arange(3).repeat_interleave(40)
    feats = centers[blob] + 0.5 * torch.randn(120, 4)
    model = make_model()
    clusters = model.fit_gate(feats, seed=1)
    nearest = torch.cdist(feats, model.centroids_EF).argmin(-1)
    assert torch.equal(clusters, nearest)
    # Each recovered cluster is exactly one blob, and its centroid is that blob's mean.
    for e in range(3):
        members = blob[clusters == e]
        assert members.numel() == 40 and bool((members == members[0]).all())
        torch.testing.assert_close(model.centroids_EF[e], feats[clusters == e].mean(0), rtol=1e-5, atol=1e-5)


def test_experts_start_from_base_weights_and_async_training_keeps_them_independent():
    torch.manual_seed(0)
    n = 240
    x = torch.randn(n, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    model = make_model(num_experts=2, classes=4)
    for ex in model.experts:
        for a, b in zip(ex.parameters(), model.base_head.parameters()):
            assert torch.equal(a, b)
    clusters = train_async(model, x, y, base_steps=30, expert_steps=20, batch_size=64)
    assert torch.equal(clusters, model.assign(model.features(x)))
    # After expert training the experts differ from the (trained) base and from each other.
    w0, w1, wb = model.experts[0].weight, model.experts[1].weight, model.base_head.weight
    assert not torch.equal(w0, wb) and not torch.equal(w0, w1)
    # Re-training expert 1 alone reproduces it exactly: it depends on nothing but its cluster.
    from megamoe.research.single_gate import train_expert
    snapshot = {k: v.clone() for k, v in model.experts[1].state_dict().items()}
    w0_before = w0.detach().clone()
    model.reset_experts_from_base()
    train_expert(model, 1, x[clusters == 1], y[clusters == 1], steps=20, batch_size=64)
    for k, v in model.experts[1].state_dict().items():
        torch.testing.assert_close(v, snapshot[k])
    assert not torch.equal(model.experts[0].weight, w0_before)  # reset, and untouched by expert 1


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="exit_threshold"):
        make_model(exit_threshold=1.5)
    with pytest.raises(ValueError, match="confidence"):
        make_model(confidence="margin")
    model = make_model()
    with pytest.raises(ValueError, match="feature_size=4"):
        model.assign(torch.randn(3, 7))
