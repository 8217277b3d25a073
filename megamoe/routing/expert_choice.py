"""Expert Choice routing (Zhou et al. 2022): each expert picks its top tokens.

Shape legend: T tokens (batch and sequence flattened), D hidden size, E experts,
K slots per token (here the most experts any token got; unused slots hold -1),
N sequences and S sequence length (causal-safe mode).

Router ``expert_choice``. Scores ``S = softmax(x W^T)`` [T, E] in fp32. With capacity
factor ``c`` (``options.capacity_factor``; null means the paper's default 2) each expert
takes exactly ``k = min(T, ceil(T * c / E))`` tokens: its top-k by ``S[:, e]``. The combine
weight of a (token, expert) pair is ``S[t, e]``, not renormalised. There is no balance loss
(``aux_loss_coef`` is ignored; balance is exact by construction); ``z_loss_coef`` applies.
``top_k`` is unused: a token gets 0..E experts.

Options (``RouterConfig.options``, see :class:`ExpertChoiceOptions`):

- ``max_experts_per_token`` (b): cap experts per token as in the paper's LP
  ``max <S, A>`` with expert sums k, token sums <= b and ``0 <= A <= 1``. The cap holds
  exactly: the assignment is an *integral* solution of that LP, found by scipy's HiGHS
  (``linprog``; the constraint matrix is a bipartite incidence matrix, hence totally
  unimodular, so the simplex's basic optimum is 0/1 and is checked to be). Every token gets at
  most b experts and every expert exactly k tokens (when ``E * k <= T * min(b, E)``; otherwise,
  e.g. T=7, E=4, c=b=2, as many as possible, at most k each). ``lp_solver`` picks the values
  the integral solve maximises: ``exact`` (default) the scores S, i.e. the exact optimum of the
  paper's LP (the lambda -> 0 limit of its entropic one); ``dykstra`` the paper's method: the
  entropy-regularised LP ``max <S, A> + lam * H(A)`` by KL (Bregman) projections with Dykstra
  corrections on the two inequality sets, in the log domain so that ``lam = 1e-3`` does not
  overflow, run until the constraints hold within ``lp_tolerance`` (relative) or for
  ``lp_iterations`` sweeps, then rounded by the same integral solve on ``A`` (ties by S). At
  lam = 1e-3 the projections converge slowly (68% off after 100 sweeps, 0.9% after 3000, on 512
  tokens) and rounding their solution keeps less of the objective, which is why the exact solve
  is the default. The solve runs on the CPU (the scores are copied there, a device sync on GPU) and is
  not cheap: 54 / 239 ms at T = 512 / 2048, E = 8 on a shared 2-core CPU, about a third of the
  capped layer's train step (tools/results/bench_routers_cpu.md, tools/bench/bench_routers.py).
  Statistics: ``lp_seconds``, ``lp_iterations`` and ``lp_violation`` (dykstra),
  ``over_cap_fraction`` (always 0 now).
- ``causal_mode``: Expert Choice lets a token's selection depend on later tokens of the batch,
  which leaks the future in an autoregressive model. In a causal layer (``RoutingContext.causal``)
  the router refuses unless ``causal_mode="prefix"``: expert e takes token t of a sequence iff
  t ranks within the top ``(t + 1) * c / E`` of ``S[:t+1, e]`` (its own sequence prefix, ties to
  the earlier token). Every token's routing is then a function of its prefix only; each expert
  gets ``c / E`` of the tokens in expectation instead of exactly (first tokens of a sequence
  go to many experts). Sequences are the last leading dimension of the layer input
  (``RoutingContext.sequence_length``); 2-D input is one sequence.

Statistics: ``experts_per_token_hist`` [E+1] (fraction of tokens with 0, 1, ... experts),
``zero_expert_fraction`` and ``mean_experts_per_token``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megamoe.config import ConfigError, RouterConfig, RouterOptions, check_fields, spec
from megamoe.routing.base import Router, RoutingContext, RoutingDecision, counts_per_expert, register_router
from megamoe.routing.losses import z_loss
from megamoe.routing.topk import SCORE_FUNCS, LinearRouterMixin, score

CAUSAL_MODES = ("off", "prefix")
LP_SOLVERS = ("exact", "dykstra")
DEFAULT_CAPACITY_FACTOR = 2.0


@dataclass(frozen=True)
class ExpertChoiceOptions(RouterOptions):
    """Options of the ``expert_choice`` router.

    score_func: ``softmax`` (the paper) or ``sigmoid`` scores, in fp32.
    capacity_factor: c; each expert takes ceil(T * c / E) tokens (null: the paper's 2).
    max_experts_per_token: b, cap on experts per token via the entropy-regularised LP
        (null: no cap). Must be >= the capacity factor, or the LP is infeasible.
    lp_solver: ``exact`` (integral optimum of the LP on the scores) or ``dykstra`` (the
        paper's entropic projections, then the integral solve on their solution).
    lp_entropy: lam, the entropy weight of the LP (paper: 1e-3; ``dykstra`` only).
    lp_iterations: most projection sweeps (paper: at most 100; ``dykstra`` only).
    lp_tolerance: stop the projections once expert sums are within this relative error of k
        and token sums exceed b by at most this relative amount (``dykstra`` only).
    causal_mode: ``off`` (plain EC, refused in causal models) or ``prefix`` (causal-safe).
    """

    score_func: str = spec("softmax", choices=SCORE_FUNCS)
    capacity_factor: float | None = spec(None, gt=0)
    max_experts_per_token: int | None = spec(None, ge=1)
    lp_solver: str = spec("exact", choices=LP_SOLVERS)
    lp_entropy: float = spec(1e-3, gt=0)
    lp_iterations: int = spec(100, ge=1)
    lp_tolerance: float = spec(1e-3, ge=0)
    causal_mode: str = spec("off", choices=CAUSAL_MODES)

    def __post_init__(self) -> None:
        check_fields(self)


def expert_choice_capacity(num_tokens: int, *, num_experts: int, capacity_factor: float) -> int:
    """k = min(T, ceil(T * c / E)): tokens each expert takes."""
    return min(num_tokens, int(math.ceil(num_tokens * capacity_factor / num_experts)))


def mask_to_slots(mask_TE: Tensor, weights_TE: Tensor) -> tuple[Tensor, Tensor]:
    """Turn a per-(token, expert) assignment into slots: ids_TK (experts ascending, -1 pad), w_TK.

    K is the most experts any token holds (at least 1).
    """
    num_tokens, num_experts = mask_TE.shape
    counts_T = mask_TE.sum(dim=1)
    top_k = max(1, int(counts_T.max())) if num_tokens else 1
    top_k = min(top_k, num_experts)
    ar_E = torch.arange(num_experts, device=mask_TE.device)
    # Selected experts sort first (in expert order), unselected after them.
    order_TK = torch.where(mask_TE, ar_E, ar_E + num_experts).argsort(dim=1)[:, :top_k]
    valid_TK = torch.arange(top_k, device=mask_TE.device) < counts_T[:, None]
    ids_TK = torch.where(valid_TK, order_TK, torch.full_like(order_TK, -1))
    weights_TK = weights_TE.gather(1, order_TK) * valid_TK
    return ids_TK, weights_TK


@torch.no_grad()
def capped_assignment_lp(scores_TE: Tensor, *, capacity: int, max_per_token: int, entropy: float,
                         iterations: int, tolerance: float = 0.0, info: dict | None = None) -> Tensor:
    """Approximate solution A_TE of the paper's entropy-regularised LP, as log A (<= 0).

    max <S, A> + entropy * H(A)  s.t.  sum_t A[t, e] = capacity,  sum_e A[t, e] <= max_per_token,
    0 <= A <= 1. Solved as the KL projection of exp(S / entropy) onto the three sets, cycling:
    the expert-sum set is affine (plain Bregman projection); the token-sum and box sets are
    not, so each keeps a Dykstra correction (multiplicative, i.e. additive in log space).
    Stops after ``iterations`` sweeps, or earlier once the relative constraint violation
    (checked every 10 sweeps) is <= ``tolerance``. ``info`` (if given) receives
    ``iterations`` (sweeps run) and ``violation`` (final relative violation).
    """
    log_a = scores_TE.double() / entropy
    corr_tok = torch.zeros_like(log_a)
    corr_box = torch.zeros_like(log_a)
    log_cap, log_b = math.log(capacity), math.log(max_per_token)
    done, violation = 0, float("nan")
    for done in range(1, iterations + 1):
        log_a = log_a - (torch.logsumexp(log_a, dim=0, keepdim=True) - log_cap)
        y = log_a + corr_tok
        log_a = y - (torch.logsumexp(y, dim=1, keepdim=True) - log_b).clamp_min(0.0)
        corr_tok = y - log_a
        y = log_a + corr_box
        log_a = y.clamp_max(0.0)
        corr_box = y - log_a
        if done % 10 == 0 or done == iterations:
            a = log_a.exp()
            violation = max(float((a.sum(0) - capacity).abs().max()) / capacity,
                            float((a.sum(1) - max_per_token).clamp_min(0).max()) / max_per_token)
            if violation <= tolerance:
                break
    if info is not None:
        info.update(iterations=done, violation=violation)
    return log_a


def integral_capped_assignment(value_TE: Tensor, *, capacity: int, max_per_token: int) -> Tensor:
    """0/1 assignment mask [T, E] maximising sum value over chosen (token, expert) pairs with
    at most ``max_per_token`` experts per token and ``capacity`` tokens per expert; every expert
    gets exactly ``capacity`` when that is feasible (E * capacity <= T * min(b, E), capacity <= T),
    else the most pairs possible. Exact: scipy's HiGHS on the LP, whose bipartite constraint
    matrix is totally unimodular, so its basic optimum is integral (checked)."""
    # Imported here so that `import megamoe` does not pay for scipy.optimize.
    from scipy.optimize import linprog
    from scipy.sparse import csr_array, vstack

    num_tokens, num_experts = value_TE.shape
    value = value_TE.detach().double().cpu().numpy().reshape(-1)  # x is row-major [T, E]
    n = num_tokens * num_experts
    ones = np.ones(n)
    expert_sums = csr_array((ones, (np.tile(np.arange(num_experts), num_tokens), np.arange(n))), shape=(num_experts, n))
    token_sums = csr_array((ones, (np.repeat(np.arange(num_tokens), num_experts), np.arange(n))), shape=(num_tokens, n))
    cap_E = np.full(num_experts, float(capacity))
    b_T = np.full(num_tokens, float(max_per_token))
    if capacity <= num_tokens and num_experts * capacity <= num_tokens * min(max_per_token, num_experts):
        res = linprog(-value, A_ub=token_sums, b_ub=b_T, A_eq=expert_sums, b_eq=cap_E, bounds=(0, 1),
                      method="highs")
    else:
        # Infeasible with exact expert loads: maximise the number of pairs first (a bonus per
        # pair larger than any possible difference in total value), then the value.
        bonus = float(np.abs(value).sum()) + 1.0
        res = linprog(-(value + bonus), A_ub=vstack([token_sums, expert_sums]), b_ub=np.concatenate([b_T, cap_E]),
                      bounds=(0, 1), method="highs")
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"expert_choice capped assignment: HiGHS failed ({res.message})")
    x = res.x
    if np.abs(x - np.round(x)).max() > 1e-6:
        raise RuntimeError("expert_choice capped assignment: HiGHS returned a fractional solution")
    return torch.from_numpy(np.round(x).reshape(num_tokens, num_experts) > 0.5).to(value_TE.device)


@torch.no_grad()
def prefix_selection(scores_NSE: Tensor, *, capacity_factor: float) -> Tensor:
    """Causal-safe selection mask [N, S, E]: token t taken by e iff fewer than (t+1)*c/E of the
    tokens s <= t outrank it (score > or, on ties, earlier). Depends on the prefix only."""
    num_seq, seq_len, num_experts = scores_NSE.shape
    pos = torch.arange(seq_len, device=scores_NSE.device)
    earlier_SS = pos[None, :] < pos[:, None]  # [t, s]: s strictly before t
    # Threshold in float64 from integers: exactly reproducible whatever the batch holds.
    limit_S = (pos.double() + 1.0) * capacity_factor / num_experts
    mask = torch.empty(scores_NSE.shape, dtype=torch.bool, device=scores_NSE.device)
    for e in range(num_experts):
        sc_NS = scores_NSE[..., e]
        outrank_NSS = (sc_NS[:, None, :] >= sc_NS[:, :, None]) & earlier_SS
        rank_NS = outrank_NSS.sum(dim=-1)
        mask[..., e] = rank_NS.double() < limit_S
    return mask


@register_router("expert_choice", options=ExpertChoiceOptions)
class ExpertChoiceRouter(LinearRouterMixin, Router):
    """Expert Choice router (see module docstring)."""

    options: ExpertChoiceOptions

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int,
                 options: ExpertChoiceOptions | None = None) -> None:
        options = options or ExpertChoiceOptions()
        super().__init__(config, hidden_size=hidden_size, num_experts=num_experts, options=options)
        self.capacity_factor = float(options.capacity_factor or DEFAULT_CAPACITY_FACTOR)
        b = options.max_experts_per_token
        if b is not None:
            if b < self.capacity_factor:
                raise ConfigError(
                    f"router.options.max_experts_per_token={b} is invalid: with capacity_factor="
                    f"{self.capacity_factor} experts take c*T slots in all, so each token needs room for at "
                    f"least c experts; use max_experts_per_token >= {math.ceil(self.capacity_factor)}")
            if options.causal_mode != "off":
                raise ConfigError("router.options.max_experts_per_token cannot be combined with causal_mode="
                                  f"{options.causal_mode!r}: the LP couples all tokens of the batch")
        self._init_weight(num_experts, hidden_size)
        self._lp_stats: dict[str, Tensor] = {}

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        cfg, opts = self.config, self.options
        ctx = ctx or RoutingContext()
        if ctx.causal and opts.causal_mode == "off":
            raise ValueError(
                "router 'expert_choice' is not causal: an expert's choice of token t depends on later tokens "
                "of the batch, which leaks the future in an autoregressive model. Set "
                "router.options.causal_mode: prefix (each token is routed from its own sequence prefix), "
                "use a token-choice router, or build the layer with causal=False for a bidirectional model.")
        logits_TE = self.logits(x_TD, jitter_eps=cfg.jitter_eps)
        scores_TE = score(logits_TE, opts.score_func)
        num_tokens = x_TD.shape[0]
        self._lp_stats: dict[str, Tensor] = {}
        if opts.causal_mode == "prefix":
            mask_TE = self._prefix_mask(scores_TE.detach(), ctx.sequence_length)
        else:
            mask_TE = self._choice_mask(scores_TE.detach())
        ids_TK, weights_TK = mask_to_slots(mask_TE, scores_TE)
        kept_E = counts_per_expert(ids_TK, self.num_experts)
        aux = cfg.z_loss_coef * z_loss(logits_TE) if cfg.z_loss_coef > 0 else None
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=weights_TK, tokens_per_expert_E=kept_E,
                               aux_loss=aux, selected_per_expert_E=kept_E,
                               stats=self._stats(mask_TE, num_tokens))

    def _choice_mask(self, scores_TE: Tensor) -> Tensor:
        num_tokens = scores_TE.shape[0]
        mask_TE = torch.zeros(scores_TE.shape, dtype=torch.bool, device=scores_TE.device)
        if num_tokens == 0:
            return mask_TE
        cap = expert_choice_capacity(num_tokens, num_experts=self.num_experts, capacity_factor=self.capacity_factor)
        opts = self.options
        b = opts.max_experts_per_token
        if b is not None and b < self.num_experts:
            t0 = time.perf_counter()
            value_TE = scores_TE
            if opts.lp_solver == "dykstra":
                info: dict = {}
                log_a = capped_assignment_lp(scores_TE, capacity=cap, max_per_token=b, entropy=opts.lp_entropy,
                                             iterations=opts.lp_iterations, tolerance=opts.lp_tolerance, info=info)
                # LP value first; among (near-)equal values the higher score.
                value_TE = log_a.exp() + 1e-3 * scores_TE.double()
                self._lp_stats.update(lp_iterations=torch.tensor(float(info["iterations"])),
                                      lp_violation=torch.tensor(info["violation"]))
            mask_TE = integral_capped_assignment(value_TE, capacity=cap, max_per_token=b)
            self._lp_stats["lp_seconds"] = torch.tensor(time.perf_counter() - t0)
            return mask_TE
        top_EK = torch.topk(scores_TE.t(), cap, dim=1).indices
        mask_TE.scatter_(0, top_EK.t(), True)
        return mask_TE

    def _prefix_mask(self, scores_TE: Tensor, sequence_length: int | None) -> Tensor:
        num_tokens = scores_TE.shape[0]
        seq_len = sequence_length or max(num_tokens, 1)
        if num_tokens % seq_len:
            raise ValueError(f"expert_choice causal_mode='prefix': {num_tokens} tokens are not a whole number of "
                             f"sequences of length {seq_len}")
        scores_NSE = scores_TE.reshape(-1, seq_len, self.num_experts)
        return prefix_selection(scores_NSE, capacity_factor=self.capacity_factor).reshape(num_tokens, self.num_experts)

    @torch.no_grad()
    def _stats(self, mask_TE: Tensor, num_tokens: int) -> dict[str, Tensor]:
        per_token_T = mask_TE.sum(dim=1)
        hist = torch.bincount(per_token_T, minlength=self.num_experts + 1).float() / max(num_tokens, 1)
        stats = {"experts_per_token_hist": hist, "zero_expert_fraction": hist[0],
                 "mean_experts_per_token": per_token_T.float().mean() if num_tokens else hist.sum() * 0}
        b = self.options.max_experts_per_token
        if b is not None:
            stats["over_cap_fraction"] = (per_token_T > b).float().mean()
            stats.update(self._lp_stats)
        return stats
