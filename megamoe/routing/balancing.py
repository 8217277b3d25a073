"""ALF-LB: auxiliary-loss-free load balancing by a per-expert selection bias.

Shape legend: L balanced MoE layers, E experts of one layer, T tokens, K slots per token.

Method (docs/methods.md, "ALF-LB"; DeepSeek 2024, Han & Zhong 2025). Every balanced router
keeps an fp32 bias ``b_E`` (a buffer, never a parameter) that is added to the scores for
*selection only*; combine weights use the unbiased scores (``TopKRouter.enable_selection_bias``).
After each optimizer step, ``c_E`` = slots selected per expert, summed over every micro-batch
of the step and over every rank, and ``e = mean(c) - c``:

- ``sign`` (DeepSeek):   ``b += u_n * sign(e)``
- ``linear``:            ``b += u_n * e / mean(c)``

with ``u_n = u`` (constant), ``u / sqrt(n)`` (inv_sqrt) or ``u / n`` (inv) at the n-th update,
and optionally ``b -= mean(b)`` (centring; selection is invariant to it). In the primal-dual
view selection is the primal step of the assignment LP with capacity T*K/E per expert,
``-b`` is the dual price and each update is one dual sub-gradient step. Both rules are
invariant to a common scale of ``c``, so ranks that see replicated tokens (tensor or
sequence parallel groups inside the counting group) do not change the update.

This module holds the update rule and the biases it moves (:class:`AuxFreeBalancer`). Counting
the selected slots, all-reducing them once per optimizer step and calling
:meth:`AuxFreeBalancer.update` is the training side's job:
``megamoe.train.step_state.MoEStepState`` (with adapters for a torch optimizer, the DeepSpeed
engine and the HF Trainer). Counts feed the update only after the step that produced them, so
no token's routing depends on its own (or any later) token's count.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megamoe.config import check_fields, from_dict, spec, to_dict
from megamoe.stats import group_size, max_vio

UPDATES = ("sign", "linear")
SCHEDULES = ("constant", "inv_sqrt", "inv")


@dataclass(frozen=True)
class AuxFreeBalancingConfig:
    """How the selection biases move.

    update: ``sign`` (b += u_n sign(e), DeepSeek) or ``linear`` (b += u_n e / mean(c)).
    step_size: u (> 0); DeepSeek uses 1e-3 with the sign rule.
    schedule: ``constant`` (u_n = u), ``inv_sqrt`` (u / sqrt(n)) or ``inv`` (u / n), n = 1, 2, ...
        the number of the update (the decaying schedules are the ones Han & Zhong analyse
        for regret bounds).
    center: subtract the mean bias after each update (keeps b bounded; selection unchanged).
    """

    update: str = spec("sign", choices=UPDATES)
    step_size: float = spec(1e-3, gt=0)
    schedule: str = spec("constant", choices=SCHEDULES)
    center: bool = False

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "AuxFreeBalancingConfig":
        return from_dict(cls, mapping, where="alf_lb")


def step_size(config: AuxFreeBalancingConfig, n: int) -> float:
    """u_n for the n-th update (n >= 1)."""
    if n < 1:
        raise ValueError(f"update number n must be >= 1, got {n}")
    if config.schedule == "constant":
        return float(config.step_size)
    if config.schedule == "inv_sqrt":
        return config.step_size / math.sqrt(n)
    return config.step_size / n


def bias_delta(counts_E: Tensor, config: AuxFreeBalancingConfig, n: int) -> Tensor:
    """The bias increment for one layer's global counts ``c_E`` at the n-th update (fp32 [E]).

    Zero when the layer routed nothing (there is no load to balance).
    """
    c = counts_E.to(torch.float64)
    mean = c.mean()
    if not bool(mean > 0):
        return torch.zeros_like(c, dtype=torch.float32)
    e = mean - c
    u = step_size(config, n)
    direction = torch.sign(e) if config.update == "sign" else e / mean
    return (u * direction).to(torch.float32)


class AuxFreeBalancer:
    """The selection biases of a list of routers and the ALF-LB rule that moves them.

    Args:
        routers: ``(name, router)`` pairs of routers with ``enable_selection_bias()`` (top-k
            routers; ``megamoe.stats.bias_routers(model)`` finds them); their bias buffers are
            created (zero) if absent, so build the balancer *before* loading a checkpoint that
            contains ``...router.expert_bias`` entries.
        config: the update rule; defaults to DeepSeek's sign rule with u = 1e-3.
        group: the ranks that hold copies of the biases (default WORLD); construction makes
            them equal to group rank 0's (a collective over ``group``).

    :meth:`update` takes one optimizer step's *global* selected counts per router (summed
    over micro-batches and ranks by the caller) and moves the biases.
    """

    def __init__(self, routers: Sequence[tuple[str, nn.Module]], config: AuxFreeBalancingConfig | None = None, *,
                 group: Any = None) -> None:
        self.config = config or AuxFreeBalancingConfig()
        if not isinstance(self.config, AuxFreeBalancingConfig):
            raise TypeError(f"config must be an AuxFreeBalancingConfig, got {type(self.config).__name__}")
        routers = list(routers)
        if not routers or not all(callable(getattr(r, "enable_selection_bias", None)) for _, r in routers):
            raise ValueError(
                "AuxFreeBalancer found no router supporting enable_selection_bias() in the model; "
                "ALF-LB needs MoE layers with a top-k router (RouterConfig.name='topk')")
        self.group = group
        self.layer_names = [name for name, _ in routers]
        self.routers = [router for _, router in routers]
        for router in self.routers:
            router.enable_selection_bias()
        with_aux = [r for r in self.routers if getattr(r.config, "aux_loss_coef", 0) > 0]
        if with_aux:  # one warning for the model (every router still gets its bias)
            cfg = with_aux[0].config
            warnings.warn(f"router {cfg.name!r} also has aux_loss_coef={cfg.aux_loss_coef}: ALF-LB is meant to "
                          "replace the auxiliary loss (set RouterConfig.aux_loss_coef=0)", stacklevel=3)
        self.num_updates = 0
        self.last_metrics: dict[str, float] = {}
        self.sync_biases()

    # ------------------------------------------------------------------ state
    def biases(self) -> dict[str, Tensor]:
        """Router name -> the live bias buffer [E]."""
        return {name: router.expert_bias for name, router in zip(self.layer_names, self.routers)}

    @torch.no_grad()
    def sync_biases(self) -> None:
        """Make every rank's biases equal to group rank 0's (one broadcast; collective)."""
        if group_size(self.group) == 1:
            return
        flat = torch.cat([r.expert_bias.detach().reshape(-1) for r in self.routers])
        staged = flat.cpu() if (flat.is_cuda and dist.get_backend(self.group) == "gloo") else flat
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(staged, src=src, group=self.group)
        sizes = [int(r.expert_bias.numel()) for r in self.routers]
        for router, part in zip(self.routers, torch.split(staged, sizes)):
            router.expert_bias.copy_(part.to(router.expert_bias.device))

    def state_dict(self) -> dict[str, Any]:
        """Balancer state (the biases themselves are in the model's state dict)."""
        return {"num_updates": self.num_updates, "layer_names": list(self.layer_names),
                "config": to_dict(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = list(state.get("layer_names", self.layer_names))
        if names != self.layer_names:
            raise ValueError(f"balancer checkpoint covers layers {names}, this model has {self.layer_names}")
        saved = state.get("config")
        if saved is not None and saved != to_dict(self.config):
            warnings.warn(f"loading ALF-LB state saved with config {saved} into a balancer with "
                          f"{to_dict(self.config)}; the step-size schedule continues from the saved "
                          "update count", stacklevel=2)
        self.num_updates = int(state["num_updates"])

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, counts: Sequence[Tensor]) -> dict[str, float]:
        """One ALF-LB step from one optimizer step's global selected counts (one ``[E]`` per
        router, in :attr:`routers` order).

        Returns ``alflb/max_vio_batch/<router>`` (MaxVio of these counts),
        ``alflb/max_vio_batch`` (mean over routers), ``alflb/step_size``, ``alflb/bias_abs_max``
        and ``alflb/slots`` (selected slots of the first router). When nothing was counted the
        biases stay as they are and only ``alflb/slots`` (0) is reported.
        """
        counts = list(counts)
        if len(counts) != len(self.routers):
            raise ValueError(f"update needs counts for {len(self.routers)} routers, got {len(counts)}")
        if not any(bool(c.sum() > 0) for c in counts):
            self.last_metrics = {"alflb/slots": 0.0}
            return dict(self.last_metrics)
        self.num_updates += 1
        for router, c_E in zip(self.routers, counts):
            bias = router.expert_bias
            bias.add_(bias_delta(c_E, self.config, self.num_updates).to(bias.device))
            if self.config.center:
                bias.sub_(bias.mean())
        vio_L = torch.stack([max_vio(c.cpu()) for c in counts])
        abs_max = torch.stack([r.expert_bias.detach().abs().max().to("cpu", torch.float64)
                               for r in self.routers]).max()
        values = torch.cat([vio_L, vio_L.mean().reshape(1), abs_max.reshape(1),
                            counts[0].sum().cpu().to(torch.float64).reshape(1)]).tolist()  # one host sync
        metrics = {f"alflb/max_vio_batch/{name}": v for name, v in zip(self.layer_names, values)}
        metrics.update({"alflb/max_vio_batch": values[-3], "alflb/bias_abs_max": values[-2],
                        "alflb/slots": values[-1], "alflb/step_size": step_size(self.config, self.num_updates)})
        self.last_metrics = metrics
        return dict(metrics)


__all__ = ["AuxFreeBalancingConfig", "AuxFreeBalancer", "bias_delta", "step_size", "UPDATES", "SCHEDULES"]
