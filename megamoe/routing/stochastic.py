"""THOR stochastic experts (Zuo et al. 2021; METHODS.md section 6): router ``stochastic``
and the two-pass consistency objective.

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

The objective: two forward passes with independent draws,
``loss = CE(p1) + CE(p2) + alpha * SKL(p1, p2)`` where
``SKL(p, q) = (KL(p||q) + KL(q||p)) / 2`` averaged over non-ignored positions. It is
given three ways: :func:`thor_loss` (a closure producing logits, for any training loop),
:class:`ConsistencyObjective` (calls a model on a batch dict), and
:class:`ThorTrainerMixin` (a ``compute_loss`` override for the Hugging Face ``Trainer``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe.config import ConfigError, RouterConfig, check_arg, check_fields, spec
from megamoe.routing.base import (PrivateDrawsMixin, Router, RoutingContext, RoutingDecision, counts_per_expert,
                                  register_router)

GRANULARITIES = ("batch", "token")
EVAL_MODES = ("random", "ensemble")


@dataclass(frozen=True)
class StochasticOptions:
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


# ---------------------------------------------------------------------------------------- objective
def _flatten(logits: Tensor, labels: Tensor, *, shift: bool, ignore_index: int) -> tuple[Tensor, Tensor]:
    if shift:
        # Causal LM: position s predicts label s+1.
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"thor_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                         "(logits must be [..., V] with labels [...]; pass shift_labels=True for causal LMs)")
    logits_NV = logits.reshape(-1, logits.shape[-1]).float()
    labels_N = labels.reshape(-1)
    return logits_NV, labels_N


def symmetric_kl(logits_a_NV: Tensor, logits_b_NV: Tensor, mask_N: Tensor | None = None) -> Tensor:
    """``(KL(p_a||p_b) + KL(p_b||p_a)) / 2`` per position, averaged over ``mask_N``.

    Gradients flow into both arguments (neither pass is treated as the target).
    """
    lp_a = F.log_softmax(logits_a_NV.float(), dim=-1)
    lp_b = F.log_softmax(logits_b_NV.float(), dim=-1)
    skl_N = 0.5 * ((lp_a.exp() * (lp_a - lp_b)).sum(-1) + (lp_b.exp() * (lp_b - lp_a)).sum(-1))
    if mask_N is None:
        return skl_N.mean()
    m = mask_N.to(skl_N.dtype)
    return (skl_N * m).sum() / m.sum().clamp_min(1.0)


@dataclass
class ThorLoss:
    """The objective and its parts (ce1, ce2, skl are detached-free tensors of the graph)."""

    loss: Tensor
    ce1: Tensor
    ce2: Tensor
    skl: Tensor
    logits1: Tensor
    logits2: Tensor


def thor_loss(forward: Callable[[], Tensor], labels: Tensor, *, alpha: float = 1.0, ignore_index: int = -100,
              shift_labels: bool = False) -> ThorLoss:
    """Two calls of ``forward`` (each returning logits [..., V]) with independent expert draws.

    labels: [...] class ids; ``ignore_index`` positions (padding) are left out of both the
    cross-entropies and the consistency term. shift_labels: causal-LM alignment.
    """
    check_arg("thor_loss", "alpha", alpha, float, ge=0)
    logits1 = forward()
    logits2 = forward()
    l1, y = _flatten(logits1, labels, shift=shift_labels, ignore_index=ignore_index)
    l2, _ = _flatten(logits2, labels, shift=shift_labels, ignore_index=ignore_index)
    mask = y != ignore_index
    if not bool(mask.any()):
        zero = (l1.sum() + l2.sum()) * 0.0
        return ThorLoss(zero, zero, zero, zero, logits1, logits2)
    ce1 = F.cross_entropy(l1, y, ignore_index=ignore_index)
    ce2 = F.cross_entropy(l2, y, ignore_index=ignore_index)
    skl = symmetric_kl(l1, l2, mask)
    return ThorLoss(ce1 + ce2 + alpha * skl, ce1, ce2, skl, logits1, logits2)


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"THOR objective: the model returned {type(output).__name__} without logits; "
                        "return a tensor or an object/dict with a 'logits' entry")
    return logits


@dataclass
class ConsistencyObjective:
    """THOR objective for a model called as ``model(**batch)`` (labels taken from the batch).

    alpha: weight of the symmetric-KL consistency term (the paper uses 1-5).
    labels_key: the batch entry holding labels; it is not passed to the model.
    shift_labels: True for causal LMs whose logits at s predict token s+1.
    """

    alpha: float = spec(1.0, ge=0)
    ignore_index: int = -100
    labels_key: str = spec("labels", nonempty=True)
    shift_labels: bool = False

    def __post_init__(self) -> None:
        check_fields(self)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> ThorLoss:
        if self.labels_key not in batch:
            raise KeyError(f"ConsistencyObjective: batch has no {self.labels_key!r} entry (keys: {sorted(batch)})")
        inputs = {k: v for k, v in batch.items() if k != self.labels_key}
        return thor_loss(lambda: _logits_of(model(**inputs)), batch[self.labels_key], alpha=self.alpha,
                         ignore_index=self.ignore_index, shift_labels=self.shift_labels)


class ThorTrainerMixin:
    """Mix into ``transformers.Trainer`` to train with the THOR objective::

        class ThorTrainer(ThorTrainerMixin, Trainer):
            thor_alpha = 1.0
            thor_shift_labels = True   # causal LMs

    The labels are withheld from the model (so it does not compute its own loss) and the
    two-pass objective is returned instead.
    """

    thor_alpha: float = 1.0
    thor_shift_labels: bool = False
    thor_ignore_index: int = -100

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
        objective = ConsistencyObjective(alpha=self.thor_alpha, ignore_index=self.thor_ignore_index,
                                         shift_labels=self.thor_shift_labels)
        result = objective(model, inputs)
        if return_outputs:
            return result.loss, {"logits": result.logits1}
        return result.loss


__all__ = ["StochasticOptions", "StochasticRouter", "seed_draws", "symmetric_kl", "ThorLoss", "thor_loss",
           "ConsistencyObjective", "ThorTrainerMixin"]
