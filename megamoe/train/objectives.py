"""Training objectives of the routers that need one from the training loop.

Shape legend: T tokens, E experts, B batch, S sequence, V classes (vocabulary), N positions
(B*S, or B for sequence classification).

- :func:`estimator_loss` (the ``skip`` and ``balanced`` routers, docs/methods.md "Unbiased
  capacity-aware estimators"): the loss to back-propagate instead of the plain mean. It takes
  each router's record of its latest training forward (``ScoreFunctionRouter.take_record``)
  and the per-token losses, and returns the Horvitz-Thompson weighted mean loss plus a term of
  value 0 whose gradient is each router's score-function estimate (baseline: an exponential
  moving average of past estimates, updated here). Called once per training forward (per
  micro-batch under gradient accumulation).
- THOR (the ``stochastic`` router, docs/methods.md "THOR"): two forward passes with independent
  expert draws, ``loss = CE(p1) + CE(p2) + alpha * SKL(p1, p2)`` with
  ``SKL(p, q) = (KL(p||q) + KL(q||p)) / 2`` averaged over non-ignored positions:
  :func:`thor_loss` (a closure producing logits, for any training loop) and
  :class:`ConsistencyObjective` (calls a model on a batch dict); the Hugging Face Trainer's
  form is ``megamoe.integrations.hf.ThorTrainerMixin``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe.config import check_arg, check_fields, spec
from megamoe.routing.estimators import score_function_routers


def estimator_loss(model: nn.Module, token_loss: Tensor, *, reduction: str = "mean") -> Tensor:
    """The loss to back-propagate for a model holding ``skip``/``balanced`` routers.

    token_loss: per-token losses of the last training forward (any shape with T elements, in
        the order the MoE layers saw the tokens: leading dims flattened), with graph.
    reduction: ``mean`` (divide by T) or ``sum``.

    Returns sum_t w_t * l_t (/ T), whose value is the Horvitz-Thompson estimate of the loss
    and whose gradient adds each router's score-function term. Consumes the routers' pending
    records (a second call without a new forward raises) and updates their baselines.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is invalid: allowed values are 'mean', 'sum'")
    routers = [r for r in score_function_routers(model) if r.pending is not None]
    if not routers:
        raise ValueError("estimator_loss found no pending routing samples: call it once after each training-mode "
                         "forward of a model that holds a 'skip' or 'balanced' router")
    loss_T = token_loss.reshape(-1)
    num_tokens = loss_T.shape[0]
    weight_T = torch.ones(num_tokens, dtype=torch.float32, device=loss_T.device)
    for r in routers:
        rec_tokens = r.pending.loss_weight_T.shape[0]
        if rec_tokens != num_tokens:
            raise ValueError(f"token_loss has {num_tokens} elements but a router saw {rec_tokens} tokens; pass the "
                             "unreduced per-token loss (reduction='none') of the same forward")
        weight_T = weight_T * r.pending.loss_weight_T.to(weight_T)
    est_T = weight_T.to(loss_T.dtype) * loss_T
    est_detached_T = est_T.detach().float()
    total = est_T.sum()
    for r in routers:
        rec = r.take_record()
        b = r.current_baseline()
        # (logp - logp.detach()) is 0 in value, so the returned value stays the loss estimate.
        zero_TE = rec.log_probs_TE - rec.log_probs_TE.detach()
        if rec.credit == "token":
            adv_T = est_detached_T - b
            r.update_baseline(float(est_detached_T.mean()) if num_tokens else 0.0)
        else:
            assert rec.group_T is not None
            group_loss = torch.zeros(int(rec.group_T.max()) + 1 if num_tokens else 0, device=loss_T.device)
            group_loss = group_loss.index_add(0, rec.group_T, est_detached_T)
            adv_T = group_loss[rec.group_T] - b
            r.update_baseline(float(group_loss.mean()) if num_tokens else 0.0)
        total = total + (adv_T[:, None] * rec.score_coef_TE * zero_TE).sum().to(total.dtype)
    return total / num_tokens if reduction == "mean" and num_tokens else total



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


__all__ = ["estimator_loss", "symmetric_kl", "ThorLoss", "thor_loss", "ConsistencyObjective"]
