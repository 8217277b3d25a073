"""Single-gated MoE with a base branch (Royer et al. 2023; docs/methods.md, "Single-gated MoE").

Shape legend: N samples, F gate feature size, E experts, V classes.

:class:`SingleGatedMoE` wraps a classifier split in two, ``stem`` (input -> features h,
always runs) and ``base_head`` (h -> base logits, the *base branch*). It adds E experts,
each a copy of ``base_head`` (or of a given ``expert_head``) initialised from the base's
weights, and ONE gate for the whole network that sends each sample to one expert: the
nearest of E centroids in gate-feature space (``gate_features(h)``, default h flattened).

Prediction: ``log((1 - w) * p_base + w * p_expert)`` with ``w = ensemble_weight``. Early
exit: a sample whose base confidence (max probability, or ``1 - H(p)/log V`` with
``confidence="entropy"``) is at least ``exit_threshold`` skips its expert entirely and is
predicted by the base alone; threshold 0 gives the base alone for every sample, None never
exits. The threshold applies in eval mode (training always runs the chosen expert) unless
passed explicitly to ``forward``.

Asynchronous training (:func:`train_async`, the workflow the paper describes)::

    1. train the base branch (stem + base_head) on all data         -> train_base
    2. experts <- copies of the trained base head                     -> reset_experts_from_base
    3. K-means on the base's per-sample gate features; the centroids
       become the gate, which then stays fixed                         -> fit_gate
    4. train each expert on its own cluster only, stem/base frozen,
       with the ensemble loss; experts share nothing, so step 4 can
       run as E separate jobs (one per process or machine)             -> train_expert

Because the gate is never trained jointly with the experts, there is no routing collapse.
K-means is ``scipy.cluster.vq.kmeans2`` (k-means++ initialisation, seeded).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIDENCES = ("max_prob", "entropy")


@dataclass
class SingleGateOutput:
    """log_probs_NV: the prediction (ensemble, or base for exited samples).
    base_logits_NV: the base branch. expert_ids_N: the gate's choice (all samples).
    exited_N: samples that skipped their expert. expert_fraction: share of samples that
    ran an expert (the compute knob)."""

    log_probs_NV: Tensor
    base_logits_NV: Tensor
    expert_ids_N: Tensor
    exited_N: Tensor

    @property
    def expert_fraction(self) -> float:
        n = self.exited_N.numel()
        return 0.0 if n == 0 else float((~self.exited_N).sum()) / n


def _flatten_features(h: Tensor) -> Tensor:
    return h.reshape(h.shape[0], -1)


class SingleGatedMoE(nn.Module):
    """A base branch plus E experts behind one per-sample gate (see module docstring)."""

    def __init__(self, stem: nn.Module, base_head: nn.Module, *, num_experts: int, feature_size: int,
                 expert_head: nn.Module | None = None,
                 gate_features: Callable[[Tensor], Tensor] | None = None,
                 exit_threshold: float | None = None, ensemble_weight: float = 0.5,
                 confidence: str = "max_prob") -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"SingleGatedMoE: num_experts={num_experts!r} must be a positive integer")
        if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size <= 0:
            raise ValueError(f"SingleGatedMoE: feature_size={feature_size!r} must be a positive integer "
                             "(the width of gate_features(stem(x)))")
        if not 0.0 <= ensemble_weight <= 1.0:
            raise ValueError(f"SingleGatedMoE: ensemble_weight={ensemble_weight} must be in [0, 1]")
        if confidence not in CONFIDENCES:
            raise ValueError(f"SingleGatedMoE: confidence={confidence!r} is invalid; allowed values are "
                             f"{', '.join(map(repr, CONFIDENCES))}")
        _check_threshold(exit_threshold)
        self.stem = stem
        self.base_head = base_head
        template = expert_head if expert_head is not None else base_head
        self.experts = nn.ModuleList(copy.deepcopy(template) for _ in range(num_experts))
        self.gate_features = gate_features or _flatten_features
        self.register_buffer("centroids_EF", torch.zeros(num_experts, feature_size))
        self.exit_threshold = exit_threshold
        self.ensemble_weight = ensemble_weight
        self.confidence = confidence

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    # ------------------------------------------------------------------ gate
    def assign(self, feats_NF: Tensor) -> Tensor:
        """Nearest centroid (Euclidean) for each sample: int64 [N]."""
        if feats_NF.shape[-1] != self.centroids_EF.shape[-1]:
            raise ValueError(f"gate features have width {feats_NF.shape[-1]}, the gate expects "
                             f"feature_size={self.centroids_EF.shape[-1]}")
        d_NE = torch.cdist(feats_NF.float(), self.centroids_EF.float())
        return d_NE.argmin(dim=-1)

    @torch.no_grad()
    def features(self, x: Tensor, *, batch_size: int = 4096) -> Tensor:
        """Gate features of the (trained) stem for every sample: [N, F]."""
        return torch.cat([self.gate_features(self.stem(x[i:i + batch_size])).float()
                          for i in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def fit_gate(self, feats_NF: Tensor, *, iters: int = 50, seed: int = 0) -> Tensor:
        """K-means (k = num_experts) on ``feats_NF``; the centroids become the gate.

        Returns each sample's cluster, i.e. its nearest final centroid.
        """
        if feats_NF.shape[0] < self.num_experts:
            raise ValueError(f"fit_gate: {feats_NF.shape[0]} samples cannot make {self.num_experts} clusters")
        from scipy.cluster.vq import kmeans2

        data = feats_NF.detach().double().cpu().numpy()
        centroids, _ = kmeans2(data, self.num_experts, iter=iters, minit="++", missing="warn",
                               seed=np.random.default_rng(seed))
        self.centroids_EF.copy_(torch.from_numpy(centroids).to(self.centroids_EF))
        # kmeans2's labels predate its last centroid update; assign against the final ones.
        return self.assign(feats_NF)

    @torch.no_grad()
    def reset_experts_from_base(self) -> None:
        """Copy the base head's weights into every expert (needs expert_head=None or same shapes)."""
        state = self.base_head.state_dict()
        for expert in self.experts:
            expert.load_state_dict(state)

    # ------------------------------------------------------------------ forward
    def base_confidence(self, base_logits_NV: Tensor) -> Tensor:
        logp = F.log_softmax(base_logits_NV.float(), dim=-1)
        if self.confidence == "max_prob":
            return logp.exp().max(dim=-1).values
        entropy = -(logp.exp() * logp).sum(-1)
        return 1.0 - entropy / max(np.log(base_logits_NV.shape[-1]), 1e-12)

    def forward(self, x: Tensor, *, exit_threshold: float | None | str = "default") -> SingleGateOutput:
        if exit_threshold == "default":
            threshold = self.exit_threshold if not self.training else None
        else:
            threshold = exit_threshold  # type: ignore[assignment]
            _check_threshold(threshold)
        h = self.stem(x)
        base_logits = self.base_head(h)
        ids_N = self.assign(self.gate_features(h))
        base_logp = F.log_softmax(base_logits.float(), dim=-1)
        if threshold is None:
            exited_N = torch.zeros(ids_N.shape, dtype=torch.bool, device=ids_N.device)
        else:
            exited_N = self.base_confidence(base_logits) >= threshold
        out = base_logp
        run = (~exited_N).nonzero().flatten()
        if run.numel() > 0:
            w = self.ensemble_weight
            mixed = torch.empty(run.numel(), base_logp.shape[-1], dtype=base_logp.dtype, device=base_logp.device)
            run_ids = ids_N[run]
            for e in run_ids.unique().tolist():
                pos = (run_ids == e).nonzero().flatten()
                rows = run[pos]
                exp_logp = F.log_softmax(self.experts[e](h[rows]).float(), dim=-1)
                # log((1-w) p_b + w p_e), computed stably in log space.
                parts = [t for t in ((base_logp[rows] + np.log(1 - w)) if w < 1 else None,
                                     (exp_logp + np.log(w)) if w > 0 else None) if t is not None]
                mixed = mixed.index_copy(0, pos, torch.logsumexp(torch.stack(parts), dim=0))
            out = base_logp.index_copy(0, run, mixed)
        return SingleGateOutput(log_probs_NV=out, base_logits_NV=base_logits, expert_ids_N=ids_N,
                                exited_N=exited_N)


def _check_threshold(t: float | None) -> None:
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
        raise ValueError(f"SingleGatedMoE: exit_threshold={t!r} must be in [0, 1] (confidence at or above "
                         "it exits early; 0 = always the base alone) or None (never exit)")


# ---------------------------------------------------------------------------------- asynchronous training
def _minibatches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(n, (min(batch_size, n),), generator=gen)


def train_base(model: SingleGatedMoE, x: Tensor, y: Tensor, *, steps: int, lr: float = 1e-3,
               batch_size: int = 128, seed: int = 0) -> list[float]:
    """Step 1: train stem + base_head with cross-entropy on all data. Returns the losses."""
    params = list(model.stem.parameters()) + list(model.base_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for idx in _minibatches(x.shape[0], batch_size, steps, gen):
        loss = F.cross_entropy(model.base_head(model.stem(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_expert(model: SingleGatedMoE, expert: int, x: Tensor, y: Tensor, *, steps: int, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0) -> list[float]:
    """Step 4 for one expert: train ``experts[expert]`` alone on (x, y), its cluster's samples,
    with the ensemble's NLL; stem, base head and gate stay fixed. Touches no other expert."""
    if x.shape[0] == 0:
        return []
    head = model.experts[expert]
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + expert)
    w = model.ensemble_weight
    losses = []
    model.stem.eval()
    model.base_head.eval()
    head.train()
    for idx in _minibatches(x.shape[0], batch_size, steps, gen):
        with torch.no_grad():
            h = model.stem(x[idx])
            base_logp = F.log_softmax(model.base_head(h).float(), dim=-1)
        exp_logp = F.log_softmax(head(h).float(), dim=-1)
        parts = [t for t in ((base_logp + np.log(1 - w)) if w < 1 else None,
                             (exp_logp + np.log(w)) if w > 0 else None) if t is not None]
        loss = F.nll_loss(torch.logsumexp(torch.stack(parts), dim=0), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_async(model: SingleGatedMoE, x: Tensor, y: Tensor, *, base_steps: int, expert_steps: int,
                lr: float = 1e-3, batch_size: int = 128, seed: int = 0) -> Tensor:
    """The whole asynchronous workflow (steps 1-4 of the module docstring), experts in turn.

    Returns the cluster of every training sample.
    """
    train_base(model, x, y, steps=base_steps, lr=lr, batch_size=batch_size, seed=seed)
    model.reset_experts_from_base()
    model.eval()
    clusters = model.fit_gate(model.features(x), seed=seed)
    for e in range(model.num_experts):
        mine = clusters == e
        train_expert(model, e, x[mine], y[mine], steps=expert_steps, lr=lr, batch_size=batch_size, seed=seed)
    model.eval()
    return clusters


__all__ = ["SingleGatedMoE", "SingleGateOutput", "train_base", "train_expert", "train_async"]
