"""CompeteSMoE competition routing (Pham et al. 2024; docs/methods.md, "CompeteSMoE"), router ``compete``.

Shape legend: T tokens, D hidden size, E experts, K experts per token.

On a *competition step* the router runs every expert on its tokens (through
``RoutingContext.compute_all_experts``, which the layer provides, so remote experts under
expert parallelism are reached through the dispatcher exactly as local ones are), scores
each expert by its affinity ``a_TE`` (``mean_d softplus(y_e)``, or the L2 norm of ``y_e``),
routes every token to its top-K experts by affinity with weights ``a / sum(top-K a)``, and
trains the router to predict the competition::

    aux = mse_coef * MSE(softmax(logits), softmax(a).detach())
          [+ winners_coef * MSE restricted to the K winning experts]
          [+ diversity_coef * mean pairwise cosine of the winners' outputs]

The targets are detached, so the router loss sends no gradient into the experts; the
experts learn through the competition output (the weights depend on their outputs). On
every other step the router is an ordinary top-K router (softmax/sigmoid scores, the
Switch/GShard balance loss and z-loss of the :class:`RouterConfig`).

Schedule (all decisions are a pure function of ``(seed, step)``, so every micro-batch of a
step, every data-parallel rank and every re-run agree; no global RNG is touched):
- ``step < warmup_steps``: never compete;
- otherwise the step competes with probability ``compete_prob``;
- on a competing step a random subset of ``max_compete_layers`` of the ``num_layers`` MoE
  layers competes (``RoutingContext.layer_index`` identifies the layer). Without
  ``max_compete_layers`` every layer competes on a competing step.
In eval mode the router never competes unless ``compete_in_eval`` is set. Competition
steps are dropless (``capacity_factor`` applies to the top-K steps only).

Cost: a competition step runs all E experts on every token (E/K times the routed FLOPs),
and the layer then runs the K winners again on the dispatched rows, so its expert FLOPs
are (E + K) / K times an ordinary step's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.config import ConfigError, RouterConfig, spec
from megamoe.routing.base import RoutingContext, RoutingDecision, counts_per_expert, register_router
from megamoe.routing.topk import TokenChoiceOptions, TopKRouter

AFFINITIES = ("softplus_mean", "l2_norm")


@dataclass(frozen=True)
class CompeteOptions(TokenChoiceOptions):
    """``RouterConfig.options`` of the ``compete`` router: the top-k options of its ordinary
    steps (:class:`~megamoe.routing.topk.TokenChoiceOptions`) and

    affinity: ``softplus_mean`` (mean_d softplus(y), CompeteSMoE v2) or ``l2_norm`` (v1).
    warmup_steps: steps (``MoELayer.step``) without competition at the start of training.
    compete_prob: probability that a step after warm-up is a competition step.
    num_layers: number of MoE layers in the model (needed with ``max_compete_layers``).
    max_compete_layers: at most this many layers compete on one step (None = all).
    seed: seeds the schedule.
    mse_coef: weight of the router's MSE to the competition's softmax(affinity).
    winners_coef: weight of the same error restricted to the K winning experts.
    diversity_coef: weight of the mean pairwise cosine similarity of the winners' outputs
        (this term does reach the experts: it pushes them apart).
    compete_in_eval: also compete in eval mode (off: inference uses the router).
    """

    affinity: str = spec("softplus_mean", choices=AFFINITIES)
    warmup_steps: int = spec(0, ge=0)
    compete_prob: float = spec(0.05, ge=0, le=1)
    num_layers: int | None = spec(None, ge=1)
    max_compete_layers: int | None = spec(None, ge=1)
    seed: int = spec(0, ge=0)
    mse_coef: float = spec(0.01, ge=0)
    winners_coef: float = spec(0.0, ge=0)
    diversity_coef: float = spec(0.0, ge=0)
    compete_in_eval: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_compete_layers is not None and self.num_layers is None:
            raise ConfigError(f"CompeteOptions.max_compete_layers={self.max_compete_layers} needs "
                              "CompeteOptions.num_layers (the number of MoE layers in the model) to pick which "
                              "layers compete")


class CompetitionSchedule:
    """Which (step, layer) pairs compete; a pure function of the options' seed."""

    def __init__(self, options: CompeteOptions) -> None:
        self.options = options
        self._memo: tuple[int, frozenset[int] | None] | None = None

    def step_competes(self, step: int) -> bool:
        o = self.options
        if step < o.warmup_steps or o.compete_prob <= 0:
            return False
        return bool(self._rng(step).random() < o.compete_prob)

    def competing_layers(self, step: int) -> frozenset[int] | None:
        """Layer indices competing at ``step``; None means every layer (no cap configured)."""
        o = self.options
        if not self.step_competes(step):
            return frozenset()
        if o.max_compete_layers is None or o.max_compete_layers >= o.num_layers:  # type: ignore[operator]
            return None
        rng = self._rng(step)
        rng.random()  # the draw step_competes consumed
        chosen = rng.choice(o.num_layers, size=o.max_compete_layers, replace=False)
        return frozenset(int(i) for i in chosen)

    def competes(self, step: int, layer_index: int) -> bool:
        o = self.options
        if o.num_layers is not None and not 0 <= layer_index < o.num_layers:
            raise ValueError(
                f"compete router: layer_index={layer_index} is outside router.options.num_layers="
                f"{o.num_layers}; build MoELayer(..., layer_index=i) with i the MoE layer's position "
                "in [0, num_layers)")
        # Every layer asks once per forward; draw the step's layer set once.
        if self._memo is None or self._memo[0] != step:
            self._memo = (step, self.competing_layers(step))
        layers = self._memo[1]
        return layers is None or layer_index in layers

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, step])


def affinity(y_ETD: Tensor, kind: str) -> Tensor:
    """Affinity of each expert for each token, fp32 [T, E]."""
    y = y_ETD.float()
    if kind == "softplus_mean":
        a_ET = F.softplus(y).mean(dim=-1)
    elif kind == "l2_norm":
        a_ET = y.norm(dim=-1)
    else:  # pragma: no cover - validated by CompeteOptions
        raise ValueError(kind)
    return a_ET.transpose(0, 1)


@register_router("compete", options=CompeteOptions)
class CompeteRouter(TopKRouter):
    """Competition routing on scheduled steps, top-K routing otherwise (see module docstring)."""

    options: CompeteOptions

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int, options=None) -> None:
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts,
                         options=options or CompeteOptions())
        self.schedule = CompetitionSchedule(self.options)

    def is_competition(self, ctx: RoutingContext) -> bool:
        if not self.training and not self.options.compete_in_eval:
            return False
        return self.schedule.competes(ctx.step, ctx.layer_index)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        ctx = ctx or RoutingContext()
        if not self.is_competition(ctx):
            decision = super().forward(x_TD, ctx)
            return dataclasses.replace(
                decision, stats={**decision.stats, "competition": torch.zeros((), device=x_TD.device)})
        if ctx.compute_all_experts is None:
            raise RuntimeError("compete router: a competition step needs RoutingContext.compute_all_experts "
                               "(MoELayer provides it); call the router through MoELayer")
        return self.compete(x_TD, ctx.compute_all_experts(x_TD))

    def compete(self, x_TD: Tensor, y_ETD: Tensor) -> RoutingDecision:
        """The competition decision given every expert's output ``y_ETD`` on ``x_TD``."""
        o, k = self.options, self.config.top_k
        a_TE = affinity(y_ETD, o.affinity)
        top_a_TK, ids_TK = torch.topk(a_TE, k, dim=-1)
        weights_TK = top_a_TK / top_a_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        logits_TE = self.logits(x_TD, jitter_eps=self.config.jitter_eps)
        pred_TE = torch.softmax(logits_TE, dim=-1)
        target_TE = torch.softmax(a_TE.detach(), dim=-1)
        aux = o.mse_coef * F.mse_loss(pred_TE, target_TE)
        if o.winners_coef > 0:
            aux = aux + o.winners_coef * F.mse_loss(pred_TE.gather(1, ids_TK), target_TE.gather(1, ids_TK))
        if o.diversity_coef > 0 and k > 1:
            aux = aux + o.diversity_coef * _winner_similarity(y_ETD, ids_TK)
        if self.config.z_loss_coef > 0:
            from megamoe.routing.losses import z_loss
            aux = aux + self.config.z_loss_coef * z_loss(logits_TE)

        counts_E = counts_per_expert(ids_TK, self.num_experts)
        with torch.no_grad():
            agree = (pred_TE.topk(k, dim=-1).indices.sort(-1).values == ids_TK.sort(-1).values).all(-1)
            stats = {"competition": torch.ones((), device=x_TD.device),
                     "router_agreement": agree.float().mean() if agree.numel() else torch.zeros(())}
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=weights_TK, tokens_per_expert_E=counts_E,
                               aux_loss=aux, selected_per_expert_E=counts_E, stats=stats, dropless=True)


def _winner_similarity(y_ETD: Tensor, ids_TK: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between the outputs of each token's K winners."""
    num_tokens, k = ids_TK.shape
    if num_tokens == 0:
        return y_ETD.sum() * 0.0
    tok = torch.arange(num_tokens, device=ids_TK.device)
    win_TKD = F.normalize(y_ETD.float()[ids_TK, tok[:, None]], dim=-1)
    sim_TKK = win_TKD @ win_TKD.transpose(1, 2)
    off_diag = ~torch.eye(k, dtype=torch.bool, device=sim_TKK.device)
    return sim_TKK[:, off_diag].mean()
