"""Token-choice top-k routing: Switch (K=1), GShard (K=2), and any K.

Shape legend: T tokens, D hidden size, E experts, K experts per token.

Scores are computed in fp32 (autocast is disabled inside the router) as softmax or
sigmoid of ``x W^T``. Each token picks its top-K experts; the combine weights are the
selected scores, optionally renormalised to sum to 1. With a capacity factor an expert
keeps at most C slots and the rest are dropped (their tokens pass through the residual).

An optional selection bias ``expert_bias`` [E] (a buffer, no gradient) shifts which
experts are *selected* without changing the combine weights; load balancers such as
ALF-LB own and update it.

Its settings are :class:`TopKOptions` (``RouterConfig.options``); :class:`TokenChoiceOptions`,
the part other top-k-style routers share (``compete``), holds the score function, weight
normalisation, capacity and drop policy. Capacity in eval mode is ``eval_capacity_factor``
(None: the training one; ``"dropless"``: none).

Causality. Tokens are flattened [batch, seq] -> T in row-major order, so with drop policy
``position`` an over-full expert keeps the slots of the earliest flattened tokens: a token's
drop depends only on its own sequence's earlier tokens and on the sequences before it in the
batch, never on later tokens of its own sequence (tests/unit/test_topk.py perturbs a later
token and checks that earlier outputs are bit-identical). With ``probs`` the expert keeps the
highest-scoring slots of the whole batch, so a later token can push an earlier one out: the
decoder LM (``megamoe.model.ModelConfig``) refuses that unless ``allow_noncausal_drops``.
Either way C = ceil(T*K/E * c) depends on T, so incremental decoding (a few tokens per call)
drops differently from training; ``eval_capacity_factor: dropless`` avoids that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe.config import RouterConfig, RouterOptions, check_fields, spec
from megamoe.routing.base import (Router, RoutingContext, RoutingDecision, counts_per_expert,
                                  register_router)
from megamoe.routing.capacity import apply_capacity, expert_capacity
from megamoe.routing.losses import load_balancing_loss, z_loss


class LinearRouterMixin(nn.Module):
    """A bias-free linear scoring head ``weight`` [E, D] evaluated in fp32."""

    weight: nn.Parameter

    def _init_weight(self, num_experts: int, hidden_size: int) -> None:
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def logits(self, x_TD: Tensor, *, jitter_eps: float = 0.0) -> Tensor:
        """Router logits [T, E] in fp32 (fp64 for fp64 inputs); autocast cannot lower them."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.to(dtype)
            if self.training and jitter_eps > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - jitter_eps, 1.0 + jitter_eps)
            return F.linear(x, self.weight.to(dtype))


SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class TokenChoiceOptions(RouterOptions):
    """Options every token-choice top-k router has (``RouterConfig.options``).

    score_func: ``softmax`` or ``sigmoid``, computed in fp32.
    normalize_weights: renormalise the selected top-k scores to sum to 1.
    capacity_factor: None for dropless; else C = ceil(T*K/E * capacity_factor).
    eval_capacity_factor: the capacity factor in eval mode: None = the same as
        ``capacity_factor``, a number > 0, or ``"dropless"`` (as DeepSpeed's
        ``eval_capacity_factor``; e.g. train with drops, evaluate and generate dropless).
    drop_policy: which slots an over-full expert keeps: ``probs`` (highest score) or
        ``position`` (earliest token; causal within a sequence, see the module docstring).
    """

    score_func: str = spec("softmax", choices=SCORE_FUNCS)
    normalize_weights: bool = True
    capacity_factor: float | None = spec(None, gt=0)
    eval_capacity_factor: float | str | None = spec(None, gt=0, choices=("dropless",))
    drop_policy: str = spec("probs", choices=DROP_POLICIES)

    def __post_init__(self) -> None:
        check_fields(self)

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor in force in training or eval mode (None: dropless)."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return None if self.eval_capacity_factor == "dropless" else float(self.eval_capacity_factor)


@dataclass(frozen=True)
class TopKOptions(TokenChoiceOptions):
    """Options of the ``topk`` router: :class:`TokenChoiceOptions` and

    routed_scaling_factor: multiplies the routed experts' combine weights (after any
        renormalisation; shared experts are not scaled), as DeepSeek-V3 / GLM-4-MoE do.
    """

    routed_scaling_factor: float = spec(1.0, gt=0)


def score(logits_TE: Tensor, score_func: str) -> Tensor:
    if score_func == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"unknown score_func {score_func!r}")


@register_router("topk", options=TopKOptions)
class TopKRouter(LinearRouterMixin, Router):
    """Token-choice top-k router (see module docstring)."""

    expert_bias: Tensor | None
    options: TokenChoiceOptions

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int,
                 options: TokenChoiceOptions | None = None) -> None:
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts,
                         options=options or TopKOptions())
        self._init_weight(num_experts, hidden_size)
        self.register_buffer("expert_bias", None, persistent=True)

    @classmethod
    def causal_problem(cls, config: RouterConfig) -> str | None:
        o = config.options
        factors = [o.capacity_factor, o.capacity_factor_for(training=False)]
        if o.drop_policy == "probs" and any(f is not None for f in factors):
            return (f"router {config.name!r} with a capacity (capacity_factor={o.capacity_factor}, "
                    f"eval_capacity_factor={o.eval_capacity_factor}) and drop_policy='probs' is not causal: an "
                    "over-full expert keeps the highest-scoring tokens of the whole batch, so a later token can "
                    "cause an earlier one to be dropped")
        return None

    def enable_selection_bias(self) -> Tensor:
        """Create (once) and return the fp32 selection bias buffer [E], zero-initialised."""
        if self.expert_bias is None:
            self.expert_bias = torch.zeros(self.num_experts, dtype=torch.float32, device=self.weight.device)
        return self.expert_bias

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        cfg, o = self.config, self.options
        logits_TE = self.logits(x_TD, jitter_eps=cfg.jitter_eps)
        scores_TE = score(logits_TE, o.score_func)
        select_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        _, ids_TK = torch.topk(select_TE.detach(), cfg.top_k, dim=-1)
        weights_TK = scores_TE.gather(1, ids_TK)
        if o.normalize_weights:
            # + 1e-20 rather than clamp_min: the same guard against a zero sum, no backward ops.
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        scaling = getattr(o, "routed_scaling_factor", 1.0)
        if scaling != 1.0:
            weights_TK = weights_TK * scaling
        selected_E = counts_per_expert(ids_TK, self.num_experts)

        aux = self._aux_loss(logits_TE, scores_TE, selected_E)

        stats: dict[str, Tensor] = {}
        capacity_factor = o.capacity_factor_for(self.training)
        kept_bound = None
        if capacity_factor is not None:
            cap = expert_capacity(x_TD.shape[0], num_experts=self.num_experts, top_k=cfg.top_k,
                                  capacity_factor=capacity_factor)
            keep_TK = apply_capacity(ids_TK, weights_TK, num_experts=self.num_experts, capacity=cap,
                                     policy=o.drop_policy)
            ids_TK = torch.where(keep_TK, ids_TK, torch.full_like(ids_TK, -1))
            weights_TK = weights_TK * keep_TK
            kept_E = counts_per_expert(ids_TK, self.num_experts)
            kept_bound = self.num_experts * cap
        else:
            kept_E = selected_E
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=weights_TK, tokens_per_expert_E=kept_E,
                               aux_loss=aux, selected_per_expert_E=selected_E, stats=stats,
                               dropless=capacity_factor is None, kept_bound=kept_bound)

    def _aux_loss(self, logits_TE: Tensor, scores_TE: Tensor, selected_E: Tensor) -> Tensor | None:
        cfg = self.config
        total = None
        if cfg.aux_loss_coef > 0:
            probs = scores_TE if self.options.score_func == "softmax" else \
                scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            total = cfg.aux_loss_coef * load_balancing_loss(probs, selected_E, top_k=cfg.top_k)
        if cfg.z_loss_coef > 0:
            zl = cfg.z_loss_coef * z_loss(logits_TE)
            total = zl if total is None else total + zl
        return total
