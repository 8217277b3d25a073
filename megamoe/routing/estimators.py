"""Unbiased capacity-aware routers (after Kool, Maddison and Mnih 2021): ``skip`` and ``balanced``.

Shape legend: T tokens, D hidden size, E experts, C slots per expert, K = 1 slot per token.

Both routers train a *stochastic hard* mixture: token t goes to one expert ``e_t`` drawn by a
sampling procedure, its output is that expert's output (combine weight 1), and the objective
is the expected loss under that procedure. The router gets no pathwise gradient; it learns
from a score-function (REINFORCE) gradient, which needs each token's downstream loss.

The feedback mechanism
----------------------
In training mode each forward leaves a :class:`ScoreFunctionRecord` on the router
(``router.pending``): the router's log-probabilities (with graph), the coefficient of each
log-probability in the score of the sample that was drawn, and per-token loss weights. The
training loop computes its loss *per token* (unreduced, in the layer's token order) and calls
``megamoe.train.objectives.estimator_loss``, which takes the record
(:meth:`ScoreFunctionRouter.take_record`) and returns the scalar to back-propagate instead of
the plain mean:

    out = model(x)                                   # routers sample and record
    token_loss = F.cross_entropy(out, y, reduction="none")
    loss = estimator_loss(model, token_loss)         # value = HT-weighted mean loss
    loss.backward()

``loss`` = sum_t w_t * l_t / T (pathwise gradients for experts and everything else) plus a
term of value 0 whose gradient is the score-function estimate for each router. Its baseline
is an exponential moving average of past estimates, which is independent of the current
sample and therefore cannot bias the gradient. (An in-batch leave-one-out mean is *not*
unbiased here: the capacity skip and the joint assignment couple every token's weight to the
others' samples.) With several estimator layers the per-token loss weights multiply, which
stays unbiased for per-token models by the tower property. ``pending`` holds the record of the
router's latest training forward; each forward replaces it, so gradient accumulation calls
``estimator_loss`` once per micro-batch.

``skip``
    ``e_t ~ p(.|x_t)`` independently; tokens are visited in a uniformly random order and each
    expert keeps its first C = ceil(T / E * capacity_factor) tokens (``capacity_factor`` null:
    nothing is skipped). Given the samples, token t survives with probability
    ``pi_t = min(1, C / n_{e_t})``; its loss is weighted by ``s_t / pi_t`` (Horvitz-Thompson),
    so ``sum_t w_t l_t`` is unbiased for ``sum_t l_t`` with no capacity. Router gradient:
    ``sum_t (w_t l_t - b) grad log p(e_t|x_t)``; token t's loss is credited to its own sample
    only, which is exact when a token's loss depends on its own routing (per-token models; in a
    model that mixes tokens after the layer it drops the cross-token terms of the gradient).
``balanced``
    Exactly balanced assignments: experts get C = ceil(G / E) slots each (G tokens per group of
    consecutive tokens, ``group_size`` = 256 by default, null for the whole local batch),
    ``Z[t, (e, j)] = log p(e|x_t) + Gumbel`` and the exact linear assignment maximising
    ``sum Z`` (scipy's ``linear_sum_assignment``) picks the expert of every token. The gradient is the score function of the continuous perturbation:
    ``d log density / d log p(e|x_t) = sum_j (1 - exp(-G[t, e, j]))``, multiplied by the whole
    group's loss (the assignment couples all tokens of a group), minus the baseline.

Causal models: in training both routers couple the tokens of a batch (skip through the
capacity, balanced through the joint assignment), so in a causal layer they refuse unless
nothing couples them (``skip`` with ``capacity_factor: null``). Eval-mode routing is per token.

In eval mode both routers send every token to its most likely expert (no capacity), or, with
``eval_mode: sample``, to a sampled one; nothing is recorded.

Random draws and parallelism
----------------------------
Under data or expert parallelism each rank routes only its own tokens: skip's capacity
``C`` is computed from the rank's local token count (each rank's experts-to-be keep their
first C tokens *of that rank*), balanced's groups are groups of the rank's local tokens, and
each rank keeps its own EMA baseline (each is independent of the current sample, so every
rank's estimate and their sum stay unbiased). An EP layer therefore computes exactly what
the single-process layer computes on each rank's tokens separately, with that rank's draws.
Draws come from torch's global RNG, so ranks seeded identically (the usual
``torch.manual_seed`` for identical initialisation) draw *identical* random numbers for
their different tokens: still unbiased, but correlated across ranks. Call
:func:`seed_estimator_draws` to give every router a private generator seeded from
``(seed, router index, rank)``: draws become reproducible, independent of the global RNG and
of other ranks (tests/distributed/test_routers_ep.py builds its reference that way).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from megamoe.config import ConfigError, RouterConfig, RouterOptions, check_fields, spec
from megamoe.routing.base import (PrivateDrawsMixin, Router, RoutingContext, RoutingDecision, counts_per_expert,
                                  register_router)
from megamoe.routing.capacity import apply_capacity, expert_capacity
from megamoe.routing.losses import z_loss
from megamoe.routing.topk import LinearRouterMixin

EVAL_MODES = ("argmax", "sample")
BASELINES = ("ema", "none")


@dataclass(frozen=True)
class ScoreFunctionRecord:
    """What one training forward of an estimator router leaves for :func:`estimator_loss`.

    log_probs_TE: log p(e|x_t), attached to the router's graph.
    score_coef_TE: detached; d log q(sample) / d log p(e|x_t) for the drawn sample.
    loss_weight_T: detached per-token loss weights (Horvitz-Thompson; 1 when nothing skips).
    credit: ``token`` (token t's loss scores only its own sample) or ``group`` (the summed
        loss of the tokens in ``group_T``'s group scores every sample of that group).
    group_T: int64 group index of each token (``group`` credit).
    """

    log_probs_TE: Tensor
    score_coef_TE: Tensor
    loss_weight_T: Tensor
    credit: str
    group_T: Tensor | None = None


@dataclass(frozen=True)
class EstimatorOptions(RouterOptions):
    """Options shared by ``skip`` and ``balanced``.

    eval_mode: ``argmax`` (most likely expert) or ``sample`` in eval mode.
    baseline: ``ema`` (moving average of past loss estimates) or ``none``.
    baseline_momentum: EMA momentum in [0, 1).
    """

    eval_mode: str = spec("argmax", choices=EVAL_MODES)
    baseline: str = spec("ema", choices=BASELINES)
    baseline_momentum: float = spec(0.9, ge=0, lt=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class SkipOptions(EstimatorOptions):
    """Options of ``skip``; adds capacity_factor: each expert keeps its first
    C = ceil(T / E * capacity_factor) tokens of the random order (null: nothing is skipped)."""

    capacity_factor: float | None = spec(None, gt=0)


@dataclass(frozen=True)
class BalancedOptions(EstimatorOptions):
    """Options of ``balanced``; adds group_size: consecutive tokens balanced together (null:
    the whole local batch). The exact assignment costs up to O(G^3) per group, so the default
    256 keeps it a small share of a layer step (tools/bench/bench_routers.py); the gradient is
    unbiased for whichever grouping is used."""

    group_size: int | None = spec(256, ge=1)


class ScoreFunctionRouter(PrivateDrawsMixin, LinearRouterMixin, Router):
    """Shared machinery: softmax policy, eval routing, pending record, EMA baseline."""

    options: EstimatorOptions
    pending: ScoreFunctionRecord | None

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int,
                 options: EstimatorOptions | None = None) -> None:
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts, options=options)
        name = config.name
        if config.top_k != 1:
            raise ConfigError(f"RouterConfig.top_k={config.top_k} is invalid for router {name!r}: it assigns "
                              "exactly one expert per token; set top_k: 1")
        self._init_weight(num_experts, hidden_size)
        self.pending = None
        self._generator: torch.Generator | None = None
        self._draw_seed: int | None = None
        self.register_buffer("baseline_value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("baseline_steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        if ctx is not None and ctx.causal and self.training and self._couples_tokens():
            raise ValueError(
                f"router {cfg.name!r} is not causal in training: {self._coupling}, so a token's routing depends "
                "on later tokens of the batch. Use it in bidirectional models (MoELayer(causal=False))"
                + (", or set options.capacity_factor: null (no skipping)" if cfg.name == "skip" else "")
                + ", or use a token-choice router.")
        logits_TE = self.logits(x_TD, jitter_eps=cfg.jitter_eps)
        log_probs_TE = torch.log_softmax(logits_TE, dim=-1)
        aux = cfg.z_loss_coef * z_loss(logits_TE) if cfg.z_loss_coef > 0 else None
        if not self.training:
            self.pending = None
            return self._eval_decision(log_probs_TE.detach(), aux)
        ids_T, keep_T, record, stats = self._sample(log_probs_TE)
        self.pending = record
        ids_TK = torch.where(keep_T, ids_T, torch.full_like(ids_T, -1))[:, None]
        selected_E = counts_per_expert(ids_T[:, None], self.num_experts)
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=keep_T.float()[:, None],
                               tokens_per_expert_E=counts_per_expert(ids_TK, self.num_experts), aux_loss=aux,
                               selected_per_expert_E=selected_E, stats=stats)

    _coupling = ""

    def _couples_tokens(self) -> bool:
        return True

    def _sample(self, log_probs_TE: Tensor) -> tuple[Tensor, Tensor, ScoreFunctionRecord, dict[str, Tensor]]:
        raise NotImplementedError

    def _eval_decision(self, log_probs_TE: Tensor, aux: Tensor | None) -> RoutingDecision:
        if log_probs_TE.shape[0] and self.options.eval_mode == "sample":
            ids_T = torch.multinomial(log_probs_TE.exp(), 1, generator=self._gen(log_probs_TE.device)).squeeze(1)
        else:
            ids_T = log_probs_TE.argmax(dim=-1)
        ids_TK = ids_T[:, None]
        counts_E = counts_per_expert(ids_TK, self.num_experts)
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=torch.ones(ids_TK.shape, device=ids_TK.device),
                               tokens_per_expert_E=counts_E, aux_loss=aux)

    def take_record(self) -> ScoreFunctionRecord | None:
        """The record of the latest training forward, handed over once (None afterwards)."""
        record, self.pending = self.pending, None
        return record

    def current_baseline(self) -> float:
        if self.options.baseline == "none" or int(self.baseline_steps) == 0:
            return 0.0
        return float(self.baseline_value)

    @torch.no_grad()
    def update_baseline(self, value: float) -> None:
        m = self.options.baseline_momentum
        first = int(self.baseline_steps) == 0
        self.baseline_value.fill_(value if first else m * float(self.baseline_value) + (1 - m) * value)
        self.baseline_steps += 1


@register_router("skip", options=SkipOptions)
class SkipRouter(ScoreFunctionRouter):
    """Sampled assignment, random-order capacity skip, Horvitz-Thompson weights (module docstring)."""

    _coupling = "whether a token is skipped depends on how many other tokens sampled its expert"

    options: SkipOptions

    def _couples_tokens(self) -> bool:
        return self.options.capacity_factor is not None

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int,
                 options: SkipOptions | None = None) -> None:
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts,
                         options=options or SkipOptions())

    def _sample(self, log_probs_TE: Tensor) -> tuple[Tensor, Tensor, ScoreFunctionRecord, dict[str, Tensor]]:
        num_tokens, num_experts = log_probs_TE.shape
        probs_TE = log_probs_TE.detach().exp()
        if num_tokens == 0:
            ids_T = torch.zeros(0, dtype=torch.int64, device=log_probs_TE.device)
        else:
            ids_T = torch.multinomial(probs_TE, 1, generator=self._gen(probs_TE.device)).squeeze(1)
        n_E = counts_per_expert(ids_T[:, None], num_experts)
        if self.options.capacity_factor is None:
            keep_T = torch.ones(num_tokens, dtype=torch.bool, device=ids_T.device)
            pi_T = torch.ones(num_tokens, device=ids_T.device)
        else:
            cap = expert_capacity(num_tokens, num_experts=num_experts, top_k=1,
                                  capacity_factor=self.options.capacity_factor)
            order = torch.randperm(num_tokens, device=ids_T.device, generator=self._gen(ids_T.device))
            keep_T = torch.empty(num_tokens, dtype=torch.bool, device=ids_T.device)
            keep_T[order] = apply_capacity(ids_T[order, None], probs_TE.new_ones(num_tokens, 1),
                                           num_experts=num_experts, capacity=cap, policy="position").squeeze(1)
            pi_T = (cap / n_E[ids_T].clamp_min(1).double()).clamp_max(1.0).float()
        weight_T = keep_T.float() / pi_T
        coef_TE = torch.zeros_like(probs_TE)
        coef_TE[torch.arange(num_tokens, device=ids_T.device), ids_T] = 1.0
        record = ScoreFunctionRecord(log_probs_TE=log_probs_TE, score_coef_TE=coef_TE, loss_weight_T=weight_T,
                                     credit="token")
        stats = {"skipped_fraction": (~keep_T).float().mean() if num_tokens else weight_T.sum() * 0,
                 "max_ht_weight": weight_T.max() if num_tokens else weight_T.sum() * 0}
        return ids_T, keep_T, record, stats


def gumbel_assignment(log_probs_TE: Tensor, gumbel_TEC: Tensor) -> Tensor:
    """Expert of each token in the assignment maximising sum Z, Z[t, (e, j)] = log p + G.

    Every expert has C slots (C * E >= T), so each expert gets at most C tokens and, when
    C * E == T, exactly C. Returns int64 [T].
    """
    # Imported here so that `import megamoe` does not pay for scipy.optimize.
    from scipy.optimize import linear_sum_assignment

    num_tokens, num_experts, slots = gumbel_TEC.shape
    z = (log_probs_TE.detach().double()[:, :, None] + gumbel_TEC.double()).reshape(num_tokens, num_experts * slots)
    rows, cols = linear_sum_assignment(z.cpu().numpy(), maximize=True)
    ids = np.empty(num_tokens, dtype=np.int64)
    ids[rows] = cols // slots
    return torch.from_numpy(ids).to(log_probs_TE.device)


@register_router("balanced", options=BalancedOptions)
class BalancedRouter(ScoreFunctionRouter):
    """Gumbel-perturbed exact balanced assignment with its score-function gradient (module docstring)."""

    options: BalancedOptions
    _coupling = "the joint assignment of a group depends on every token in it"

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int,
                 options: BalancedOptions | None = None) -> None:
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts,
                         options=options or BalancedOptions())

    def _sample(self, log_probs_TE: Tensor) -> tuple[Tensor, Tensor, ScoreFunctionRecord, dict[str, Tensor]]:
        num_tokens, num_experts = log_probs_TE.shape
        device = log_probs_TE.device
        group = self.options.group_size or max(num_tokens, 1)
        ids_T = torch.empty(num_tokens, dtype=torch.int64, device=device)
        coef_TE = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
        group_T = torch.arange(num_tokens, device=device) // group
        solve_s = 0.0
        for start in range(0, num_tokens, group):
            stop = min(start + group, num_tokens)
            slots = math.ceil((stop - start) / num_experts)
            g = -torch.log(-torch.log(torch.rand(stop - start, num_experts, slots, dtype=torch.float64,
                                                 device=device, generator=self._gen(device)).clamp_min(1e-300)))
            t0 = time.perf_counter()
            ids_T[start:stop] = gumbel_assignment(log_probs_TE[start:stop], g)
            solve_s += time.perf_counter() - t0
            coef_TE[start:stop] = (1.0 - torch.exp(-g)).sum(dim=2).float()
        keep_T = torch.ones(num_tokens, dtype=torch.bool, device=device)
        record = ScoreFunctionRecord(log_probs_TE=log_probs_TE, score_coef_TE=coef_TE,
                                     loss_weight_T=torch.ones(num_tokens, device=device), credit="group",
                                     group_T=group_T)
        return ids_T, keep_T, record, {"assignment_seconds": torch.tensor(solve_s)}


def score_function_routers(model: nn.Module) -> list[ScoreFunctionRouter]:
    return [m for m in model.modules() if isinstance(m, ScoreFunctionRouter)]


def seed_estimator_draws(module: nn.Module, seed: int | None, *, rank: int | None = None) -> int:
    """Give the i-th ``skip``/``balanced`` router in ``module`` a private generator seeded from
    ``(seed, i, rank)`` (None: back to torch's global RNG). ``rank`` defaults to this process's
    global rank (0 without torch.distributed), so ranks draw independently and reproducibly.
    The generators' states are not in the module's state_dict: to resume a run reproducibly,
    seed again (e.g. with ``seed + step``). Returns how many routers were seeded."""
    routers = score_function_routers(module)
    if seed is not None and rank is None:
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    for i, r in enumerate(routers):
        if seed is None:
            r.set_draw_seed(None)
        else:
            state = np.random.SeedSequence([int(seed), i, int(rank)]).generate_state(2, np.uint32)
            r.set_draw_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return len(routers)


__all__ = ["ScoreFunctionRecord", "EstimatorOptions", "SkipOptions", "BalancedOptions", "ScoreFunctionRouter",
           "SkipRouter",
           "BalancedRouter", "gumbel_assignment", "score_function_routers", "seed_estimator_draws"]
