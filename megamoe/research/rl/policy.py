"""Mixture-of-Gaussians policy for continuous control (PMOE, docs/methods.md, "PMOE").

A shared MLP trunk feeds K tanh-squashed Gaussian heads ("primitives") and a mixing head.
The mixing head reads the trunk features *detached*, so the mixing loss trains only the
mixing weights and the policy loss trains only the trunk and the Gaussian heads. K = 1 is
exactly the usual SAC policy.

Shape legend: B batch, K mixture components, A action dims, O observation dims, H hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0
# Initial pre-tanh std exp(-1) = 0.37: wide enough to explore, narrow enough that spread-out
# components start out covering different parts of the action box.
INIT_LOG_STD = -1.0
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# tanh(u) is pushed slightly inside (-1, 1) before atanh so stored actions on the bounds stay finite.
_ATANH_CLIP = 1.0 - 1e-6


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int | None = None) -> nn.Sequential:
    """ReLU MLP; with ``out_dim=None`` it ends on the last hidden activation (a trunk)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


@dataclass
class MixtureParams:
    """The policy's distribution at a batch of states (pre-tanh Gaussians + mixing logits)."""

    mean_BKA: torch.Tensor
    log_std_BKA: torch.Tensor
    mix_logits_BK: torch.Tensor

    @property
    def mix_log_probs_BK(self) -> torch.Tensor:
        return torch.log_softmax(self.mix_logits_BK, dim=-1)


class MixtureGaussianPolicy(nn.Module):
    """PMOE policy: shared trunk, K tanh-Gaussian heads, mixing weights on detached features.

    Actions live in the box ``[action_low, action_high]``: ``a = centre + scale * tanh(u)``
    with ``u ~ N(mean_k, std_k)``. Log-probabilities include the tanh and affine Jacobians.
    """

    def __init__(self, obs_dim: int, act_dim: int, *, components: int = 4, hidden: Sequence[int] = (256, 256),
                 action_low: Sequence[float] | torch.Tensor | None = None,
                 action_high: Sequence[float] | torch.Tensor | None = None,
                 init_log_std: float = INIT_LOG_STD) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        if not LOG_STD_MIN <= init_log_std <= LOG_STD_MAX:
            raise ValueError(f"init_log_std must lie in [{LOG_STD_MIN}, {LOG_STD_MAX}], got {init_log_std}")
        if not hidden:
            raise ValueError("hidden must name at least one layer size")
        self.obs_dim, self.act_dim, self.components = int(obs_dim), int(act_dim), int(components)
        self.trunk = mlp(obs_dim, hidden)
        self.heads = nn.Linear(hidden[-1], 2 * components * act_dim)
        self.mixing = nn.Linear(hidden[-1], components)
        low = torch.full((act_dim,), -1.0) if action_low is None else torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.full((act_dim,), 1.0) if action_high is None else torch.as_tensor(action_high, dtype=torch.float32)
        if low.shape != (act_dim,) or high.shape != (act_dim,) or not bool((high > low).all()):
            raise ValueError(f"action bounds must be two [{act_dim}] vectors with high > low, got {low} / {high}")
        self._spread_component_means(init_log_std)
        self.register_buffer("action_centre", (high + low) / 2)
        self.register_buffer("action_scale", (high - low) / 2)

    @torch.no_grad()
    def _spread_component_means(self, init_log_std: float) -> None:
        """Start the K pre-tanh means at evenly spaced points in [-1, 1] (every action dim).

        Only the best component per state is trained (PMOE), so components that start on top of
        each other compete for the same optimum and the losers never move; distinct starting
        points let different components claim different optima. K = 1 keeps the usual init.
        """
        bias = self.heads.bias.view(self.components, 2, self.act_dim)
        bias[:, 1, :] = init_log_std
        if self.components > 1:
            bias[:, 0, :] = torch.linspace(-1.0, 1.0, self.components)[:, None]

    # -- distribution -------------------------------------------------------------------------
    def forward(self, obs_BO: torch.Tensor) -> MixtureParams:
        h_BH = self.trunk(obs_BO)
        out = self.heads(h_BH).view(-1, self.components, 2, self.act_dim)
        log_std = out[:, :, 1].clamp(LOG_STD_MIN, LOG_STD_MAX)
        return MixtureParams(mean_BKA=out[:, :, 0], log_std_BKA=log_std, mix_logits_BK=self.mixing(h_BH.detach()))

    def _squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.action_centre + self.action_scale * torch.tanh(u)

    def _log_jacobian(self, u: torch.Tensor) -> torch.Tensor:
        """log |da/du| summed over action dims, numerically stable: log(1 - tanh^2 u) = 2(log 2 - u - softplus(-2u))."""
        return (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u)) + torch.log(self.action_scale)).sum(-1)

    @staticmethod
    def _gauss_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        z = (u - mean) * torch.exp(-log_std)
        return (-0.5 * z * z - log_std - _LOG_SQRT_2PI).sum(-1)

    def component_samples(self, params: MixtureParams) -> tuple[torch.Tensor, torch.Tensor]:
        """One reparameterised action from every component: ``(actions_BKA, log_prob_BK)``.

        ``log_prob_BK[b, k]`` is the log-density of component k alone (a tanh-Gaussian) at its
        own sample, the entropy term PMOE's policy loss uses for the selected component.
        """
        u = params.mean_BKA + torch.exp(params.log_std_BKA) * torch.randn_like(params.mean_BKA)
        logp = self._gauss_log_prob(u, params.mean_BKA, params.log_std_BKA) - self._log_jacobian(u)
        return self._squash(u), logp

    def log_prob(self, obs_BO: torch.Tensor, action_BA: torch.Tensor, params: MixtureParams | None = None,
                 detach_mixing: bool = False) -> torch.Tensor:
        """Mixture log-density ``log sum_k w_k(s) p_k(a | s)`` of actions in the env's box, ``[B]``."""
        params = self(obs_BO) if params is None else params
        y = ((action_BA - self.action_centre) / self.action_scale).clamp(-_ATANH_CLIP, _ATANH_CLIP)
        u_BA = torch.atanh(y)
        comp_BK = self._gauss_log_prob(u_BA.unsqueeze(1), params.mean_BKA, params.log_std_BKA)
        mix = params.mix_log_probs_BK.detach() if detach_mixing else params.mix_log_probs_BK
        return torch.logsumexp(mix + comp_BK, dim=-1) - self._log_jacobian(u_BA)

    def sample(self, params: MixtureParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw from the mixture: component ``k ~ Cat(w)``, then its tanh-Gaussian.

        Returns ``(action_BA, log_prob_B, k_B)`` where ``log_prob_B`` is the full mixture
        log-density at the action (used for the critic's entropy bonus). The component draw is
        not differentiable; gradients flow through the Gaussian's reparameterisation only.
        """
        k_B = torch.distributions.Categorical(logits=params.mix_logits_BK).sample()
        idx = k_B.view(-1, 1, 1).expand(-1, 1, self.act_dim)
        mean = params.mean_BKA.gather(1, idx).squeeze(1)
        log_std = params.log_std_BKA.gather(1, idx).squeeze(1)
        u_BA = mean + torch.exp(log_std) * torch.randn_like(mean)
        comp_BK = self._gauss_log_prob(u_BA.unsqueeze(1), params.mean_BKA, params.log_std_BKA)
        logp_B = torch.logsumexp(params.mix_log_probs_BK + comp_BK, dim=-1) - self._log_jacobian(u_BA)
        return self._squash(u_BA), logp_B, k_B

    @torch.no_grad()
    def act(self, obs_BO: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        """Actions for acting in the environment. Deterministic = mean of the heaviest component."""
        params = self(obs_BO)
        if not deterministic:
            return self.sample(params)[0]
        k_B = params.mix_logits_BK.argmax(-1)
        mean = params.mean_BKA.gather(1, k_B.view(-1, 1, 1).expand(-1, 1, self.act_dim)).squeeze(1)
        return self._squash(mean)
