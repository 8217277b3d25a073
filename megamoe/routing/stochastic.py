"""THOR stochastic experts (Zuo et al. 2021; docs/methods.md, "THOR"): router ``stochastic``.

Shape legend: T tokens, D hidden size, E experts, K slots per token, B batch, S sequence,
V classes (vocabulary), N positions (B*S, or B for sequence classification).

The router has no gate and no parameters. In training it sends the whole batch (the
reference code's choice, ``granularity: batch``) or each token (``granularity: token``) to
one expert drawn uniformly at random, with combine weight 1. At inference it either draws
a random expert per token (``eval_mode: random``, the paper) or averages every expert with
weight 1/E (``eval_mode: ensemble``, going beyond the paper; costs E times the FLOPs).
``RouterConfig.top_k`` must be 1; the balance and z-losses do not apply (there is no gate).

Draws come from torch's global RNG, so ``torch.manual_seed`` reproduces them; calling
:func:`seed_draws` gives every stochastic router of a module its own seeded generator
instead (used to make two passes draw identical experts, e.g. in tests).

The objective trains it with two forward passes with independent draws,
``loss = CE(p1) + CE(p2) + alpha * SKL(p1, p2)`` where
``SKL(p, q) = (KL(p||q) + KL(q||p)) / 2`` averaged over non-ignored positions; it is the
training side's (``megamoe.train.objectives``: :func:`thor_loss`, ``ConsistencyObjective``;
``megamoe.integrations.hf.ThorTrainerMixin`` for the Hugging Face ``Trainer``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megamoe.config import ConfigError, RouterConfig, RouterOptions, check_fields, spec
from megamoe.routing.base import (PrivateDrawsMixin, Router, RoutingContext, RoutingDecision, counts_per_expert,
                                  register_router)

GRANULARITIES = ("batch", "token")
EVAL_MODES = ("random", "ensemble")


@dataclass(frozen=True)
class StochasticOptions(RouterOptions):
    """``RouterConfig.options`` of the ``stochastic`` router.

    granularity: in training, one expert per call (``batch``) or per token (``token``).
    eval_mode: at inference, a random expert per token (``random``) or the average of all
        experts (``ensemble``).
    """

    granularity: str = spec("batch", choices=GRANULARITIES)
    eval_mode: str = spec("random", choices=EVAL_MODES)

    def __post_init__(self) -> None:
        check_fields(self)


@register_router("stochastic", options=StochasticOptions)
class StochasticRouter(PrivateDrawsMixin, Router):
    """Uniformly random expert assignment without a gate (see module docstring)."""

    options: StochasticOptions

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int, options=None) -> None:
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts,
                         options=options or StochasticOptions())
        if config.top_k != 1:
            raise ConfigError(f"RouterConfig.top_k={config.top_k} is invalid for router 'stochastic': it sends "
                              "each token to exactly one random expert; set top_k: 1")
        self._draw_seed: int | None = None
        self._generator: torch.Generator | None = None

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        num_tokens, num_experts, dev = x_TD.shape[0], self.num_experts, x_TD.device
        if not self.training and self.options.eval_mode == "ensemble":
            ids_TK = torch.arange(num_experts, device=dev).expand(num_tokens, num_experts).contiguous()
            weights_TK = torch.full((num_tokens, num_experts), 1.0 / num_experts, device=dev)
        else:
            gen = self._gen(dev)
            per_token = not self.training or self.options.granularity == "token"
            if per_token:
                ids_T = torch.randint(num_experts, (num_tokens,), device=dev, generator=gen)
            else:
                ids_T = torch.randint(num_experts, (1,), device=dev, generator=gen).expand(num_tokens)
            ids_TK = ids_T.reshape(num_tokens, 1).contiguous()
            weights_TK = torch.ones(num_tokens, 1, device=dev)
        counts_E = counts_per_expert(ids_TK, num_experts)
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=weights_TK, tokens_per_expert_E=counts_E,
                               aux_loss=None, selected_per_expert_E=counts_E, dropless=True)


def seed_draws(module: nn.Module, seed: int | None) -> int:
    """Give every stochastic router in ``module`` a generator seeded with ``seed + i``
    (i its position among them); None restores the global RNG. Returns how many were found."""
    routers = [m for m in module.modules() if isinstance(m, StochasticRouter)]
    for i, r in enumerate(routers):
        r.set_draw_seed(None if seed is None else seed + i)
    return len(routers)



__all__ = ["StochasticOptions", "StochasticRouter", "seed_draws"]
