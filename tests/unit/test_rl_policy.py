"""MixtureGaussianPolicy: mixture log-density against a direct scipy computation of the
tanh-Gaussian change of variables, normalisation, sampling distribution, gradient routing."""
import numpy as np
import pytest
import torch
from scipy import integrate, stats

from megamoe.research.rl.policy import MixtureGaussianPolicy


def _direct_log_density(params, a, low, high):
    """log p(a) = log sum_k w_k prod_d N(atanh(y_d); mu, sigma) / ((1 - y_d^2) s_d), y = (a - c) / s."""
    c, s = (high + low) / 2, (high - low) / 2
    y = (a - c) / s
    u = np.arctanh(y)
    w = torch.softmax(params.mix_logits_BK, -1).detach().double().numpy()[0]
    mu = params.mean_BKA.detach().double().numpy()[0]
    sd = np.exp(params.log_std_BKA.detach().double().numpy()[0])
    comp = np.prod(stats.norm.pdf(u[None, :], loc=mu, scale=sd), axis=-1)
    return float(np.log(np.sum(w * comp)) - np.sum(np.log((1 - y ** 2) * s)))


def _policy(k=3, act_dim=2, low=(-2.0, -0.5), high=(2.0, 1.5)):
    torch.manual_seed(1)
    pol = MixtureGaussianPolicy(4, act_dim, components=k, hidden=(16,), action_low=low, action_high=high)
    with torch.no_grad():  # distinct, non-trivial mixing weights and spreads
        pol.mixing.bias.copy_(torch.linspace(-1.0, 1.0, k))
        pol.heads.bias.view(k, 2, act_dim)[:, 1] = torch.linspace(-1.2, -0.3, k)[:, None]
    return pol


def test_mixture_log_prob_matches_direct_change_of_variables():
    low, high = np.array([-2.0, -0.5]), np.array([2.0, 1.5])
    pol = _policy(low=low, high=high)
    obs = torch.randn(1, 4)
    params = pol(obs)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = low + (high - low) * rng.uniform(0.02, 0.98, size=2)
        got = pol.log_prob(obs, torch.tensor(a, dtype=torch.float32)[None]).item()
        assert got == pytest.approx(_direct_log_density(params, a, low, high), rel=1e-4, abs=1e-4)


def test_sample_and_component_log_probs_agree_with_log_prob():
    pol = _policy()
    obs = torch.randn(64, 4)
    params = pol(obs)
    action, logp, k = pol.sample(params)
    assert torch.allclose(logp, pol.log_prob(obs, action, params), atol=1e-4)
    assert int(k.min()) >= 0 and int(k.max()) < pol.components
    # component_samples: each log-prob is that component alone (a K=1 mixture with its parameters)
    acts_BKA, logp_BK = pol.component_samples(params)
    for j in range(pol.components):
        only_j = type(params)(params.mean_BKA[:, j:j + 1], params.log_std_BKA[:, j:j + 1],
                              params.mix_logits_BK[:, j:j + 1])
        assert torch.allclose(logp_BK[:, j], pol.log_prob(obs, acts_BKA[:, j], only_j), atol=1e-4)


def test_density_integrates_to_one_in_a_1d_box():
    pol = _policy(k=4, act_dim=1, low=(-3.0,), high=(1.0,))
    obs = torch.randn(1, 4)

    # a dense grid in float64 math: the density is computed by the policy, the integral by scipy
    grid = np.linspace(-3.0, 1.0, 200_001)[1:-1]
    with torch.no_grad():
        dens = pol.log_prob(obs.expand(len(grid), 4), torch.tensor(grid, dtype=torch.float32)[:, None]).exp()
    total = integrate.trapezoid(dens.double().numpy(), grid)
    assert total == pytest.approx(1.0, abs=2e-3)


def test_samples_follow_the_mixture_cdf():
    pol = _policy(k=3, act_dim=1, low=(-1.0,), high=(1.0,))
    obs = torch.randn(1, 4)
    params = pol(obs)
    with torch.no_grad():
        a = pol.sample(type(params)(*(t.expand(20000, *t.shape[1:]) for t in
                                      (params.mean_BKA, params.log_std_BKA, params.mix_logits_BK))))[0]
    w = torch.softmax(params.mix_logits_BK, -1)[0].detach().double().numpy()
    mu = params.mean_BKA[0, :, 0].detach().double().numpy()
    sd = params.log_std_BKA[0, :, 0].exp().detach().double().numpy()

    def cdf(x):
        u = np.arctanh(np.clip(x, -1 + 1e-12, 1 - 1e-12))
        return np.sum(w[None] * stats.norm.cdf((u[:, None] - mu[None]) / sd[None]), axis=-1)

    assert stats.kstest(a[:, 0].double().numpy(), cdf).pvalue > 1e-3


def test_mixing_head_is_trained_only_through_its_own_loss():
    pol = _policy()
    params = pol(torch.randn(8, 4))
    params.mix_logits_BK.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in pol.trunk.parameters())
    pol.zero_grad()
    params = pol(torch.randn(8, 4))
    acts, logp = pol.component_samples(params)
    (acts.sum() + logp.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in pol.mixing.parameters())
    assert any(p.grad is not None and p.grad.any() for p in pol.trunk.parameters())


def test_deterministic_action_is_the_heaviest_components_mean_and_in_bounds():
    pol = _policy()
    obs = torch.randn(5, 4)
    params = pol(obs)
    a = pol.act(obs, deterministic=True)
    k = params.mix_logits_BK.argmax(-1)
    expect = pol.action_centre + pol.action_scale * torch.tanh(params.mean_BKA[torch.arange(5), k])
    assert torch.allclose(a, expect)
    stoch = pol.act(torch.randn(500, 4))
    assert bool((stoch >= torch.tensor([-2.0, -0.5])).all() and (stoch <= torch.tensor([2.0, 1.5])).all())


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="components"):
        MixtureGaussianPolicy(3, 1, components=0)
    with pytest.raises(ValueError, match="high > low"):
        MixtureGaussianPolicy(3, 1, action_low=[1.0], action_high=[1.0])
