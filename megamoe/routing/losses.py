"""Router losses and the mechanism that delivers them to autograd.

Shape legend: T tokens, E experts, K slots per token.

:func:`attach_aux_loss` ties an auxiliary loss to an activation so that its gradient
flows when the host model back-propagates through that activation: a drop-in MoE block
needs no change to the host model's forward or loss.
"""
from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs_TE: Tensor, selected_counts_E: Tensor, *, top_k: int) -> Tensor:
    """Switch (K=1) / GShard (K=2) balance loss ``E * sum_e f_e * P_e`` (unscaled).

    probs_TE: fp32 router probabilities over all experts (rows sum to 1).
    selected_counts_E: slots chosen per expert before capacity drops.
    f_e = count_e / (T * K), the fraction of choices that include e; P_e = mean_t probs.
    Equals 1 at perfect balance with uniform probabilities.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    # E * sum_e (count_e / (T*K)) * (sum_t p_te / T), as one dot product and one scale: the
    # same value in fewer ops (each op costs host time on a GPU, where small layers are
    # bound by it).
    dot = torch.dot(selected_counts_E.to(probs_TE.dtype), probs_TE.sum(dim=0))
    return dot * (num_experts / (float(num_tokens) * num_tokens * top_k))


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE), unscaled, in fp32."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x``; in backward, feeds ``grad_scale`` as d(total)/d(aux_loss)."""

    @staticmethod
    def forward(ctx, x: Tensor, aux_loss: Tensor, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux_loss)
        ctx.grad_scale = grad_scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: Tensor):  # type: ignore[override]
        (aux_loss,) = ctx.saved_tensors
        return grad_x, torch.full_like(aux_loss, ctx.grad_scale), None


def attach_aux_loss(x: Tensor, aux_loss: Tensor | None, *, grad_scale: float = 1.0) -> Tensor:
    """Return ``x`` unchanged, with ``aux_loss`` joining the backward pass through it.

    grad_scale: weight of the aux loss in the total loss; set it to 1/accumulation_steps
    when the main loss is divided by the number of micro-batches.
    """
    if aux_loss is None or not torch.is_grad_enabled() or not aux_loss.requires_grad:
        return x
    return _AttachAuxLoss.apply(x, aux_loss, grad_scale)
