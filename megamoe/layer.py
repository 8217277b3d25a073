"""MoELayer: route, run the experts through the dispatcher, add the shared expert.

Shape legend: T tokens (all leading dims flattened), D hidden size, E experts, K slots
per token, R routed rows on this rank.

``MoELayer.forward(x)`` maps [..., D] to [..., D] and is a drop-in replacement for a dense
MLP block: the auxiliary loss is attached to the output's autograd graph, so the host
model needs no change to its forward or loss. ``MoELayer.compute(x)`` returns the full
:class:`MoEOutput` (output, aux loss, statistics) for callers that want them.
Parallelism is whatever dispatcher the layer holds (local by default; see
``megamoe.parallel`` for expert parallelism): ``Dispatcher.run(x_TD, decision, experts)``
owns dispatch -> experts -> combine (see ``megamoe.dispatch.base``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from megamoe import stats
from megamoe.activations import activation_fn
from megamoe.config import ConfigError, MoEConfig, require_config
from megamoe.dispatch.base import Dispatcher
from megamoe.dispatch.local import LocalDispatcher
from megamoe.experts import ExpertBank
from megamoe.finite import require_finite
from megamoe.routing.base import RoutingContext, RoutingDecision, build_router
from megamoe.routing.losses import attach_aux_loss


@dataclass
class MoEStats:
    """Detached per-call statistics (tensors; no host sync until read).

    tokens_per_expert_E: kept slots per expert (after capacity drops), local to this rank.
    selected_per_expert_E: slots selected before drops.
    aux_loss: the scaled auxiliary loss (0 if none).
    extra: router-specific statistics.
    dropped_fraction, max_vio: derived on access (every layer call records stats, few read
    them: computing them eagerly cost ~20 small kernel launches per call on a GPU).
    """

    tokens_per_expert_E: Tensor
    selected_per_expert_E: Tensor
    aux_loss: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def dropped_fraction(self) -> Tensor:
        """Dropped slots / selected slots (0 when nothing was selected)."""
        return stats.dropped_fraction(self.tokens_per_expert_E, self.selected_per_expert_E)

    @property
    def max_vio(self) -> Tensor:
        """(max_e load_e - mean load) / mean load, on selected slots."""
        return stats.max_vio(self.selected_per_expert_E)

    def as_floats(self) -> dict[str, float]:
        out = {"dropped_fraction": float(self.dropped_fraction), "max_vio": float(self.max_vio),
               "aux_loss": float(self.aux_loss)}
        out.update({k: float(v) for k, v in self.extra.items() if v.numel() == 1})
        return out


@dataclass
class StepSignals:
    """What the training side tells the MoE layers of a model, read by every forward.

    step: optimizer steps taken so far (routers with schedules read it through
        :class:`~megamoe.routing.base.RoutingContext`).
    aux_loss_scale: d(total loss) / d(aux loss): the weight the aux loss has in the loss that
        is back-propagated (1 / gradient-accumulation steps, times the fp16 loss scale under
        DeepSpeed's dynamic loss scaling).

    A layer starts with its own (step 0, scale 1); one training-side owner
    (``megamoe.train.step_state.MoEStepState``) shares one instance with every layer of a
    model (:meth:`MoELayer.use_signals`) and is the only writer of its fields.
    """

    step: int = 0
    aux_loss_scale: float = 1.0


@dataclass
class MoEOutput:
    out: Tensor
    aux_loss: Tensor | None
    stats: MoEStats
    decision: RoutingDecision


class SharedExpert(nn.Module):
    """A dense MLP every token goes through (HF names: gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool, gate: bool) -> None:
        super().__init__()
        self.gated = activation in ("swiglu", "geglu")
        if self.gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation_fn(activation)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        h = self.act(self.gate_proj(x_TD)) * self.up_proj(x_TD) if self.gated else self.act(self.up_proj(x_TD))
        y = self.down_proj(h)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TD)) * y
        return y


class MoELayer(nn.Module):
    """A mixture-of-experts MLP block.

    Args:
        config: the layer's MoEConfig.
        dispatcher: how slots reach experts; defaults to all experts in this process.
        layer_index: position in the host model (routers may use it for schedules).
        causal: the host model is autoregressive (routers that see future tokens refuse).

    The layer holds what one forward needs and nothing of the optimizer step: ``signals``
    (:class:`StepSignals`: the step for router schedules, the aux loss's weight in the total
    loss) belongs to the training side, which shares one with every layer of a model
    (``megamoe.train.step_state``). ``last_stats`` holds the most recent call's MoEStats.
    ``check_finite`` (off by default; ``megamoe.finite.set_finite_checks(model)`` sets it on
    every layer) raises NonFiniteError naming the layer when its input or output holds NaN or
    inf, at the cost of a host sync per call. Inputs are checked by :func:`checked_input`.
    """

    def __init__(self, config: MoEConfig, *, dispatcher: Dispatcher | None = None, layer_index: int = -1,
                 causal: bool = False) -> None:
        require_config("MoELayer(config)", config, MoEConfig)
        if config.hidden_size is None:
            raise ConfigError("MoELayer(config): MoEConfig.hidden_size is unset; give the model width "
                              "(MoEConfig(hidden_size=..., ...)), or let a ModelConfig fill it in")
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.causal = causal
        self.router = build_router(config.router, hidden_size=config.hidden_size, num_experts=config.num_experts)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(config.num_experts)
        if self.dispatcher.num_experts != config.num_experts:
            raise ValueError(f"dispatcher serves {self.dispatcher.num_experts} experts, "
                             f"config has num_experts={config.num_experts}")
        self.experts = ExpertBank(config.experts, hidden_size=config.hidden_size,
                                  num_experts=self.dispatcher.num_local_experts)
        self.shared_expert = None
        if config.num_shared_experts > 0:
            self.shared_expert = SharedExpert(config.hidden_size, config.shared_size, config.experts.activation,
                                              config.experts.bias, config.shared_expert_gate)
        self.signals = StepSignals()
        self.check_finite = False
        self.last_stats: MoEStats | None = None

    # Experts as seen by routers that need every expert's output (competition routing):
    # through the dispatcher, so remote experts under expert parallelism are reached too.
    def _compute_all_experts(self, x_TD: Tensor) -> Tensor:
        return self.dispatcher.run_all(x_TD, self.experts)

    @property
    def num_experts(self) -> int:
        """E, routed experts across all expert-parallel ranks (DeepSpeed's MoE bookkeeping reads it)."""
        return self.config.num_experts

    def shard_experts(self, dispatcher: Dispatcher) -> None:
        """Keep only the experts ``dispatcher`` serves on this rank and route through it
        (expert parallelism, applied after the full model is built: ``megamoe.parallel``)."""
        if dispatcher.num_experts != self.config.num_experts:
            raise ValueError(f"dispatcher serves {dispatcher.num_experts} experts, "
                             f"config has num_experts={self.config.num_experts}")
        start = dispatcher.local_expert_offset
        self.experts.keep_experts(start, start + dispatcher.num_local_experts)
        self.dispatcher = dispatcher

    def use_signals(self, signals: StepSignals) -> None:
        """Read the step and the aux-loss scale from ``signals`` (the training side's, shared by
        every layer of the model) from now on."""
        self.signals = signals

    def _name(self) -> str:
        return f"MoE layer {self.layer_index}" if self.layer_index >= 0 else "MoELayer"

    def routing_context(self, sequence_length: int | None = None) -> RoutingContext:
        return RoutingContext(layer_index=self.layer_index, step=self.signals.step,
                              compute_all_experts=self._compute_all_experts, causal=self.causal,
                              sequence_length=sequence_length)

    def compute(self, hidden_states: Tensor) -> MoEOutput:
        """Run the layer and return output, aux loss and statistics (aux not attached)."""
        checked = checked_input(self, hidden_states)
        out_dtype, hidden_states = hidden_states.dtype, checked  # the output keeps the caller's dtype
        lead = hidden_states.shape[:-1]
        x_TD = hidden_states.reshape(-1, self.config.hidden_size)
        seq_len = hidden_states.shape[-2] if hidden_states.dim() >= 3 else None
        decision = self.router(x_TD, self.routing_context(seq_len))
        out_TD = self.dispatcher.run(x_TD, decision, self.experts)
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)
        stats = self._stats(decision)
        return MoEOutput(out=out_TD.reshape(*lead, self.config.hidden_size).to(out_dtype), aux_loss=decision.aux_loss,
                         stats=stats, decision=decision)

    def forward(self, hidden_states: Tensor) -> Tensor:
        result = self.compute(hidden_states)
        if self.check_finite:
            require_finite(result.out, f"the output of {self._name()} (its input was finite)")
        self.last_stats = result.stats
        return attach_aux_loss(result.out, result.aux_loss, grad_scale=self.signals.aux_loss_scale)

    @torch.no_grad()
    def _stats(self, decision: RoutingDecision) -> MoEStats:
        aux = decision.aux_loss.detach().float() if decision.aux_loss is not None else torch.zeros(())
        return MoEStats(tokens_per_expert_E=decision.tokens_per_expert_E.detach(),
                        selected_per_expert_E=decision.selected_counts_E.detach(), aux_loss=aux,
                        extra={k: v.detach() for k, v in decision.stats.items()})


def checked_input(layer: MoELayer, hidden_states: Tensor) -> Tensor:
    """``hidden_states`` validated for ``layer``: a clear error instead of a failure deep in
    routing or the expert GEMMs.

    dtype: without autocast the input must have the parameters' dtype, as for ``nn.Linear``.
    Under ``torch.autocast`` any floating dtype is accepted and the output comes back in the
    input's dtype. On CUDA the input passes through (the expert kernels cast the weights to
    it, as autocast would); on CPU it is cast to the parameters' dtype, because the CPU expert
    loop multiplies in one dtype.
    """
    name = layer._name()
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"{name} expects a tensor of hidden states [..., {layer.config.hidden_size}], got "
                        f"{type(hidden_states).__name__}")
    if hidden_states.dim() == 0 or hidden_states.shape[-1] != layer.config.hidden_size:
        raise ValueError(f"{name} expects inputs with last dimension hidden_size={layer.config.hidden_size} "
                         f"([..., {layer.config.hidden_size}]), got shape {tuple(hidden_states.shape)}")
    if not hidden_states.is_floating_point():
        raise ValueError(f"{name} expects floating-point hidden states, got dtype {hidden_states.dtype} (token ids "
                         "go through an embedding first)")
    param_dtype = layer.experts.first_weight.dtype
    if hidden_states.dtype != param_dtype:
        if not torch.is_autocast_enabled(hidden_states.device.type):
            raise ValueError(f"{name} got {hidden_states.dtype} input but its parameters are {param_dtype}: cast "
                             f"the input (x.to({param_dtype})), convert the layer (layer.to({hidden_states.dtype})), "
                             "or run under torch.autocast")
        if hidden_states.device.type == "cpu":
            hidden_states = hidden_states.to(param_dtype)
    if layer.check_finite:
        require_finite(hidden_states, f"the input of {name}")
    return hidden_states


def dense_mlp_reference(layer: MoELayer, x: Tensor, expert: int = 0) -> Tensor:
    """The dense MLP that expert ``expert`` of ``layer`` computes (for equivalence tests)."""
    return layer.experts.expert_forward(x.reshape(-1, x.shape[-1]), expert).reshape(x.shape)


__all__ = ["MoELayer", "MoEOutput", "MoEStats", "StepSignals", "SharedExpert", "dense_mlp_reference", "checked_input"]
