"""What happens once per optimizer step in a model of MoE layers, owned in one place.

Shape legend: L MoE layers, E experts of a layer, F = sum of E over the layers.

:class:`MoEStepState` is the training side's half of every MoE layer: the layers and routers
hold only what one forward needs (and their buffers); this object owns

- the step number and the aux loss's weight in the back-propagated loss (1 / accumulation
  steps, times the fp16 loss scale under DeepSpeed), shared with every layer through one
  :class:`~megamoe.layer.StepSignals` (routers with schedules read the step from it);
- counting each router's load during the step's forwards (:class:`megamoe.stats.LoadCounter`:
  training mode only, never inside backward) and summing it over the ranks in ONE all-reduce
  per step, the caller's own values (the loss) and the ALF-LB counts included;
- the ALF-LB bias update (:class:`megamoe.routing.balancing.AuxFreeBalancer`) from those
  global counts;
- the step's load statistics (MaxVio, load shares, dropped fraction, routing entropy, load
  percentiles, dead experts over a window of steps; :mod:`megamoe.stats`).

A training loop calls :meth:`MoEStepState.end_step` after each optimizer step (the train
job does). Adapters do it for other loops: :meth:`MoEStepState.attach_to_optimizer` (a torch
optimizer's step post-hook), ``megamoe.integrations.deepspeed.attach_step_state`` (a DeepSpeed
engine; ``initialize`` also keeps the aux-loss scale in line with the engine's loss scale) and
``megamoe.integrations.hf.MoETrainerCallback`` (the HF Trainer).

Build it before loading a checkpoint: with balancing it creates the ``...router.expert_bias``
buffers that the model's state dict then fills; :meth:`state_dict` holds the step, the ALF-LB
update count and the dead-expert window.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from megamoe import stats
from megamoe.layer import StepSignals
from megamoe.routing.balancing import AuxFreeBalancer, AuxFreeBalancingConfig

DEFAULT_DEAD_EXPERT_WINDOW = 100


@dataclass
class StepReport:
    """What :meth:`MoEStepState.end_step` measured.

    step: the number of steps ended so far (this one included).
    metrics: flat scalars: the balancer's ``alflb/...`` and, when any slot was routed on any
        rank, ``moe/max_vio``, ``moe/dropped_fraction``, ``moe/routing_entropy``,
        ``moe/dead_experts`` and ``moe/aux_loss`` (the mean over the ranks).
    load: the per-layer statistics (None when nothing was routed).
    extra: the caller's ``extra`` values summed over the ranks.
    aux_loss: the mean over micro-batches of the summed aux losses, summed over the ranks.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    load: stats.LoadReport | None = None
    extra: list[float] = field(default_factory=list)
    aux_loss: float = 0.0


class MoEStepState:
    """The per-step state of ``model``'s MoE layers (see the module docstring).

    Args:
        model: searched once for its MoE layers (``megamoe.stats.named_moe_layers``).
        balancing: an :class:`AuxFreeBalancingConfig` to balance the top-k routers with ALF-LB
            (None: no balancing).
        accumulation_steps: micro-batches per optimizer step whose losses are averaged (the
            aux loss gets the same weight).
        group: the ranks whose tokens are counted and summed (default WORLD: every data- and
            expert-parallel rank routes its own tokens). Construction (with balancing) and
            :meth:`end_step` are collective over it.
        dead_expert_window: an expert is dead when no slot selected it in each of the last
            this many steps.
    """

    def __init__(self, model: nn.Module, *, balancing: AuxFreeBalancingConfig | None = None,
                 accumulation_steps: int = 1, group: Any = None,
                 dead_expert_window: int = DEFAULT_DEAD_EXPERT_WINDOW) -> None:
        if balancing is not None and not isinstance(balancing, AuxFreeBalancingConfig):
            raise TypeError(f"balancing must be an AuxFreeBalancingConfig or None, got {type(balancing).__name__}")
        biased = stats.bias_routers(model)
        if balancing is not None and not biased:
            # (the balancer's own message: it names what ALF-LB needs)
            AuxFreeBalancer(biased, balancing, group=group)
        named = stats.named_moe_layers(model)
        if not named:
            raise ValueError(f"MoEStepState: {type(model).__name__} holds no MoE layer (megamoe.MoELayer)")
        self.group = group
        self.layer_names = [name for name, _ in named]
        self.layers = [layer for _, layer in named]
        self.signals = StepSignals()
        for layer in self.layers:
            layer.use_signals(self.signals)
        self._accumulation_steps = 1
        self._loss_scale = 1.0
        self.set_accumulation_steps(accumulation_steps)
        self.counter = stats.LoadCounter([layer.router for layer in self.layers], training_only=True)
        self.balancer = AuxFreeBalancer(biased, balancing, group=group) if balancing is not None else None
        router_index = {stats.router_name(name): i for i, name in enumerate(self.layer_names)}
        self._balanced = [router_index[name] for name, _ in biased] if self.balancer is not None else []
        self.dead = stats.DeadExperts(self.counter.sizes, window=dead_expert_window)
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.last_report: StepReport | None = None

    # ------------------------------------------------------------------ what the layers read
    def set_accumulation_steps(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"accumulation_steps={n!r} is invalid: must be an integer >= 1")
        self._accumulation_steps = n
        self._publish()

    def set_loss_scale(self, scale: float) -> None:
        """The factor the loss is multiplied by before backward (fp16 dynamic loss scaling), so
        the aux-loss gradient is scaled (and later unscaled) with it."""
        self._loss_scale = float(scale)
        self._publish()

    def _publish(self) -> None:
        self.signals.aux_loss_scale = self._loss_scale / self._accumulation_steps

    def begin_step(self, step: int | None = None) -> None:
        """Start an optimizer step: ``step`` (default: the number of steps ended so far) is
        what router schedules see during its forwards, until the next begin_step."""
        if step is not None:
            self.step = int(step)
        self.signals.step = self.step

    # ------------------------------------------------------------------ counting
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not counted (e.g. extra train-mode passes)."""
        before = self.counter.enabled
        self.counter.enabled = False
        try:
            yield
        finally:
            self.counter.enabled = before

    def pending_counts(self) -> dict[str, Tensor]:
        """This rank's selected slots since the last :meth:`end_step` (router name -> [E])."""
        return {stats.router_name(name): c.clone()
                for name, c in zip(self.layer_names, self.counter.per_layer(self.counter.selected_F))}

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def end_step(self, *, apply: bool = True, extra: Sequence[float] = ()) -> StepReport:
        """End the optimizer step: sum this step's counts (and ``extra``) over the group in one
        all-reduce, move the ALF-LB biases (unless ``apply`` is False: a step that was not
        applied contributes no load), compute the load statistics and count the step (the next
        :meth:`begin_step` shows it to the routers). Collective over the group."""
        selected_F, kept_F, aux_L, calls = self.counter.take()
        micro = max(1, calls[0] if calls else 0)
        head = torch.tensor([float(v) for v in extra], dtype=torch.float64, device=selected_F.device)
        aux_1 = (aux_L.sum() / micro).reshape(1)  # stays on the device: one host copy per step, below
        flat = stats.all_reduce_sum(torch.cat([head, aux_1, selected_F, kept_F]), self.group).cpu()
        num_extra, total = len(extra), selected_F.numel()
        extra_sums = flat[:num_extra].tolist()
        aux = float(flat[num_extra])
        selected = self.counter.per_layer(flat[num_extra + 1:num_extra + 1 + total])
        kept = self.counter.per_layer(flat[num_extra + 1 + total:])
        report = StepReport(step=self.step + 1, extra=extra_sums, aux_loss=aux)
        if self.balancer is not None and apply:
            report.metrics.update(self.balancer.update([selected[i] for i in self._balanced]))
        if float(flat[num_extra + 1:num_extra + 1 + total].sum()) > 0:
            sizes = set(self.counter.sizes)
            dead = self.dead.update(selected)
            if len(sizes) == 1:
                report.load = stats.LoadReport.of(torch.stack(selected), torch.stack(kept), dead=dead)
            else:  # layers with different expert counts: one row at a time
                rows = [stats.LoadReport.of(s[None], k[None]) for s, k in zip(selected, kept)]
                report.load = _concat_reports(rows, dead)
            report.metrics.update({f"moe/{k}": v for k, v in report.load.summary().items()})
            report.metrics["moe/aux_loss"] = aux / stats.group_size(self.group)
        self.step += 1
        self.last_metrics = dict(report.metrics)
        self.last_report = report
        return report

    def discard_pending(self) -> None:
        """Drop this rank's counts since the last :meth:`end_step` (not collective)."""
        self.counter.take()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "layer_names": list(self.layer_names),
                               "dead_experts": self.dead.state_dict()}
        if self.balancer is not None:
            out["balancer"] = self.balancer.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also a bare ALF-LB balancer state, as checkpoints
        written before the step state held it)."""
        if "num_updates" in state:  # an AuxFreeBalancer.state_dict() on its own
            if self.balancer is not None:
                self.balancer.load_state_dict(state)
            return
        if self.balancer is not None and state.get("balancer") is not None:
            self.balancer.load_state_dict(state["balancer"])
        if "dead_experts" in state:
            self.dead.load_state_dict(state["dead_experts"])
        self.begin_step(int(state.get("step", self.step)))

    # ------------------------------------------------------------------ a torch loop
    def attach_to_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """End a step after every ``optimizer.step()``; returns the removable hook handle.

        With gradient accumulation the optimizer steps once per accumulated batch, so every
        micro-batch's tokens land in one step. (A step that an AMP GradScaler skips does not
        call the hook; its counts roll into the next step.)
        """
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None:
            raise TypeError(f"attach_to_optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}; for a "
                            "DeepSpeed engine use megamoe.integrations.deepspeed.attach_step_state(engine, state)")
        def end_and_begin(opt: Any, args: Any, kwargs: Any) -> None:
            self.end_step()
            self.begin_step()

        return register(end_and_begin)

    def close(self) -> None:
        """Remove the counting hooks (the biases stay in the model and keep steering selection)."""
        self.counter.remove()


def _concat_reports(rows: list[stats.LoadReport], dead: list[int]) -> stats.LoadReport:
    return stats.LoadReport(selected=[r.selected[0] for r in rows], kept=[r.kept[0] for r in rows],
                            max_vio=[r.max_vio[0] for r in rows], shares=[r.shares[0] for r in rows],
                            dropped_fraction=[r.dropped_fraction[0] for r in rows],
                            routing_entropy=[r.routing_entropy[0] for r in rows],
                            percentiles=[r.percentiles[0] for r in rows], dead_experts=dead)


__all__ = ["MoEStepState", "StepReport", "DEFAULT_DEAD_EXPERT_WINDOW"]
