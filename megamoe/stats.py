"""Where a model's MoE layers are, and the load statistics every part of megamoe reports.

Shape legend: L MoE layers, E experts of a layer, F = sum of E over the layers (every layer's
counts flattened into one vector), Q quantiles, T tokens.

Finding layers: :func:`moe_layers` / :func:`named_moe_layers` (module order, identical on every
rank for identical models) and :func:`bias_routers` (routers that take an ALF-LB selection
bias). A module counts as an MoE layer by what it has (:class:`MoEBlock`: a router, a
dispatcher and ``compute``), so this module sits below ``megamoe.layer``, whose per-call
statistics use the definitions here.

Statistics of a layer's load ``c_E`` (slots per expert; every function also takes ``[L, E]``
and works per row, in fp64):

- :func:`max_vio`: MaxVio = (max_e c_e - mean c) / mean c, 0 where nothing was routed;
- :func:`load_shares`: c_e / sum c (0 where nothing was routed);
- :func:`dropped_fraction`: 1 - kept / selected slots (0 where nothing was selected);
- :func:`routing_entropy`: H(c / sum c) / log E in [0, 1]: 1 when every expert gets the same
  load, 0 when one expert gets all of it (0 for E = 1 and where nothing was routed);
- :func:`load_percentiles`: quantiles of the relative load c_e / mean c (1.0 = average), linear
  interpolation between order statistics (numpy's default);
- :class:`DeadExperts`: experts that were selected for no slot in each of the last ``window``
  steps (global counts; nothing is dead before ``window`` steps were seen).

Counting: :class:`LoadCounter` adds each router's decision (selected and kept slots, aux loss)
into flat device vectors in a forward hook: never inside a backward pass (activation
checkpointing recomputes forwards there) and, with ``training_only``, only in training mode.
:func:`all_reduce_sum` sums a tensor over a process group, staging it where the backend needs
(gloo on the CPU, NCCL on the GPU). :func:`evaluate_max_vio` is MaxVio over a held-out set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn

PERCENTILES = (0.1, 0.5, 0.9)


# ----------------------------------------------------------------------------- finding layers
@runtime_checkable
class MoEBlock(Protocol):
    """What makes a module an MoE layer here: ``megamoe.layer.MoELayer`` has all of it."""

    router: nn.Module
    dispatcher: Any

    def compute(self, hidden_states: Tensor) -> Any: ...


def named_moe_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(qualified name, layer)`` of every MoE layer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Module) and isinstance(m, MoEBlock)]


def moe_layers(model: nn.Module) -> list[Any]:
    """Every MoE layer of ``model``, in module order."""
    return [m for _, m in named_moe_layers(model)]


def router_name(layer_name: str) -> str:
    """The module name of the router of the MoE layer called ``layer_name``."""
    return f"{layer_name}.router" if layer_name else "router"


def bias_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(router name, router)`` of every MoE layer whose router takes a selection bias
    (``enable_selection_bias()``, the top-k routers), in module order."""
    return [(router_name(name), layer.router) for name, layer in named_moe_layers(model)
            if callable(getattr(layer.router, "enable_selection_bias", None))]


# ----------------------------------------------------------------------------- statistics
def max_vio(counts_E: Tensor) -> Tensor:
    """MaxVio = (max_e c_e - mean c) / mean c over the last dim (0 where nothing was routed); fp64."""
    c = counts_E.to(torch.float64)
    mean = c.mean(dim=-1)
    return torch.where(mean > 0, (c.amax(dim=-1) - mean) / mean.clamp_min(1e-300), torch.zeros_like(mean))


def load_shares(counts_E: Tensor) -> Tensor:
    """c_e / sum_e c_e over the last dim (0 where nothing was routed); fp64."""
    c = counts_E.to(torch.float64)
    return c / c.sum(dim=-1, keepdim=True).clamp_min(1e-300)


def dropped_fraction(kept_E: Tensor, selected_E: Tensor) -> Tensor:
    """1 - kept slots / selected slots over the last dim (0 where nothing was selected); fp64."""
    kept, selected = kept_E.to(torch.float64).sum(dim=-1), selected_E.to(torch.float64).sum(dim=-1)
    return torch.where(selected > 0, 1.0 - kept / selected.clamp_min(1e-300), torch.zeros_like(selected))


def routing_entropy(counts_E: Tensor) -> Tensor:
    """Entropy of the load distribution over the last dim, divided by log E (see the module
    docstring); fp64."""
    p = load_shares(counts_E)
    num_experts = p.shape[-1]
    if num_experts < 2:
        return torch.zeros(p.shape[:-1], dtype=torch.float64, device=p.device)
    h = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(dim=-1)
    return h / math.log(num_experts)


def load_percentiles(counts_E: Tensor, q: Sequence[float] = PERCENTILES) -> Tensor:
    """Quantiles ``q`` of the relative load c_e / mean c over the last dim: ``[..., Q]``, fp64
    (0 where nothing was routed)."""
    c = counts_E.to(torch.float64)
    mean = c.mean(dim=-1, keepdim=True)
    rel = torch.where(mean > 0, c / mean.clamp_min(1e-300), torch.zeros_like(c))
    qs = torch.tensor(list(q), dtype=torch.float64, device=c.device)
    return torch.quantile(rel, qs, dim=-1).movedim(0, -1)


class DeadExperts:
    """Experts selected for no slot in each of the last ``window`` steps, per layer.

    :meth:`update` takes one step's (global) selected counts ``[L, E]`` and returns the number
    of dead experts of each layer. The per-expert run of empty steps is its state (saved with
    the training state, so a resumed run reports what an uninterrupted one does)."""

    def __init__(self, num_experts: Sequence[int], *, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} is invalid: must be an integer >= 1")
        self.window = window
        self.empty_runs = [[0] * e for e in num_experts]

    def update(self, counts: Sequence[Tensor]) -> list[int]:
        dead = []
        for runs, c_E in zip(self.empty_runs, counts):
            for e, n in enumerate(c_E.tolist()):
                runs[e] = runs[e] + 1 if n == 0 else 0
            dead.append(sum(r >= self.window for r in runs))
        return dead

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "empty_runs": [list(r) for r in self.empty_runs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        runs = state.get("empty_runs")
        if isinstance(runs, list) and [len(r) for r in runs] == [len(r) for r in self.empty_runs]:
            self.empty_runs = [[int(v) for v in r] for r in runs]


@dataclass
class LoadReport:
    """Per-layer load statistics of one step (or of a held-out set), as plain floats.

    selected / kept: slots per expert [L][E]; the rest are the statistics above, per layer."""

    selected: list[list[float]]
    kept: list[list[float]]
    max_vio: list[float]
    shares: list[list[float]]
    dropped_fraction: list[float]
    routing_entropy: list[float]
    percentiles: list[list[float]]
    dead_experts: list[int] | None = None

    @classmethod
    def of(cls, selected_LE: Tensor, kept_LE: Tensor | None = None, *, dead: list[int] | None = None) -> "LoadReport":
        kept = selected_LE if kept_LE is None else kept_LE
        return cls(selected=selected_LE.double().tolist(), kept=kept.double().tolist(),
                   max_vio=max_vio(selected_LE).tolist(), shares=load_shares(selected_LE).tolist(),
                   dropped_fraction=dropped_fraction(kept, selected_LE).tolist(),
                   routing_entropy=routing_entropy(selected_LE).tolist(),
                   percentiles=load_percentiles(selected_LE).tolist(), dead_experts=dead)

    def summary(self) -> dict[str, float]:
        """Scalars over layers: mean MaxVio, overall dropped fraction, mean routing entropy,
        dead experts (sum over layers, when tracked)."""
        selected = sum(map(sum, self.selected))
        out = {"max_vio": _mean(self.max_vio), "routing_entropy": _mean(self.routing_entropy),
               "dropped_fraction": 1.0 - sum(map(sum, self.kept)) / selected if selected > 0 else 0.0}
        if self.dead_experts is not None:
            out["dead_experts"] = float(sum(self.dead_experts))
        return out


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


# ----------------------------------------------------------------------------- counting
def _in_backward() -> bool:
    # The autograd engine sets a graph task id on the thread only while it executes a backward
    # pass; checkpoint recomputation (reentrant or not) always runs inside one.
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class LoadCounter:
    """Accumulates every call of a list of routers: selected slots (before capacity drops: the
    load a router asked for, which balancing controls) and kept slots per expert, each in one
    flat fp64 vector ``[F]``, and the aux loss and the number of calls of each router.

    Counts only when ``enabled``, never inside a backward pass, and with ``training_only`` only
    for routers in training mode. Stays on the routers' device (no host sync per call); use
    as a context manager to remove the hooks on exit."""

    def __init__(self, routers: Iterable[nn.Module], *, training_only: bool = True) -> None:
        self.routers = list(routers)
        self.sizes = [int(r.num_experts) for r in self.routers]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        device = next((p.device for r in self.routers for p in r.parameters()), torch.device("cpu"))
        total = sum(self.sizes)
        self.selected_F = torch.zeros(total, dtype=torch.float64, device=device)
        self.kept_F = torch.zeros(total, dtype=torch.float64, device=device)
        self.aux_L = torch.zeros(len(self.routers), dtype=torch.float64, device=device)
        self.calls = [0] * len(self.routers)
        self.training_only = training_only
        self.enabled = True
        self._handles = [r.register_forward_hook(self._make_hook(i)) for i, r in enumerate(self.routers)]

    @property
    def forward_calls(self) -> int:
        """Calls of the first router since the last :meth:`take` (the number of forwards)."""
        return self.calls[0] if self.calls else 0

    def _make_hook(self, index: int) -> Callable[..., None]:
        lo, hi = self.offsets[index], self.offsets[index] + self.sizes[index]

        def hook(module: nn.Module, args: Any, decision: Any) -> None:
            if not self.enabled or (self.training_only and not module.training) or _in_backward():
                return
            selected_E = decision.selected_counts_E.detach()
            if selected_E.device != self.selected_F.device:
                # Follow the model if it moved (model.to(...) after construction).
                self._move(selected_E.device)
            with torch.no_grad():
                self.selected_F[lo:hi] += selected_E.to(torch.float64)
                self.kept_F[lo:hi] += decision.tokens_per_expert_E.detach().to(torch.float64)
                if decision.aux_loss is not None:
                    self.aux_L[index] += decision.aux_loss.detach().to(torch.float64).reshape(())
            self.calls[index] += 1

        return hook

    def _move(self, device: torch.device) -> None:
        self.selected_F, self.kept_F, self.aux_L = (t.to(device) for t in (self.selected_F, self.kept_F, self.aux_L))

    def per_layer(self, flat_F: Tensor) -> list[Tensor]:
        """``flat_F`` split into each router's ``[E]``."""
        return [flat_F[o:o + s] for o, s in zip(self.offsets, self.sizes)]

    def take(self) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """(selected_F, kept_F, aux_L, calls) accumulated since the last call; resets them."""
        out = (self.selected_F.clone(), self.kept_F.clone(), self.aux_L.clone(), list(self.calls))
        self.selected_F.zero_()
        self.kept_F.zero_()
        self.aux_L.zero_()
        self.calls = [0] * len(self.routers)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LoadCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def group_size(group: Any = None) -> int:
    """Ranks in ``group`` (1 without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: Tensor, group: Any = None) -> Tensor:
    """``t`` summed over ``group`` (returned; ``t`` itself is unchanged only on one rank).
    gloo reduces CPU tensors and NCCL CUDA ones: the tensor is staged to where the backend
    needs it and handed back on its own device."""
    if group_size(group) == 1:
        return t
    backend = dist.get_backend(group)
    if backend == "nccl" and not t.is_cuda:
        staged = t.to("cuda")
    elif backend == "gloo" and t.is_cuda:
        staged = t.cpu()
    else:
        staged = t
    dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
    if staged is not t:
        t.copy_(staged.to(t.device))
    return t


@torch.no_grad()
def evaluate_max_vio(model: nn.Module, batches: Iterable[Any], *,
                     forward: Callable[[nn.Module, Any], Any] | None = None, group: Any = None) -> dict[str, float]:
    """MaxVio_global over a held-out set: the selected slots of all batches (and all ranks of
    ``group``) summed per layer before taking MaxVio, in eval mode (training-mode counters
    such as a step state's see nothing).

    forward: ``forward(model, batch)``; defaults to ``model(batch)``. Returns
    ``max_vio_global/<router>`` and ``max_vio_global`` (mean over layers). Collective over
    ``group``."""
    named = named_moe_layers(model)
    if not named:
        raise ValueError("evaluate_max_vio found no MoE layer in the model")
    was_training = model.training
    model.eval()
    try:
        with LoadCounter([layer.router for _, layer in named], training_only=False) as counter:
            for batch in batches:
                model(batch) if forward is None else forward(model, batch)
            selected_F = all_reduce_sum(counter.take()[0], group)
            per_layer = counter.per_layer(selected_F)
    finally:
        model.train(was_training)
    vio = torch.stack([max_vio(c) for c in per_layer])
    values = torch.cat([vio, vio.mean().reshape(1)]).tolist()
    out = {f"max_vio_global/{router_name(n)}": v for (n, _), v in zip(named, values)}
    out["max_vio_global"] = values[-1]
    return out


__all__ = ["MoEBlock", "named_moe_layers", "moe_layers", "router_name", "bias_routers", "max_vio", "load_shares",
           "dropped_fraction", "routing_entropy", "load_percentiles", "DeadExperts", "LoadReport", "LoadCounter",
           "group_size", "all_reduce_sum", "evaluate_max_vio", "PERCENTILES"]
