"""ALF-LB: auxiliary-loss-free load balancing by a per-expert selection bias.

Shape legend: L balanced MoE layers, E experts of one layer, F = sum of E over the
balanced layers (all layers' counts flattened into one vector), T tokens, K slots per token.

Method (METHODS.md section 7; DeepSeek 2024, Han & Zhong 2025). Every balanced router keeps
an fp32 bias ``b_E`` (a buffer, never a parameter) that is added to the scores for *selection
only*; combine weights use the unbiased scores (``TopKRouter.enable_selection_bias``).
After each optimizer step, ``c_E`` = slots selected per expert, summed over every
micro-batch of the step and over every rank of ``group`` (one all-reduce for all layers),
and ``e = mean(c) - c``:

- ``sign`` (DeepSeek):   ``b += u_n * sign(e)``
- ``linear``:            ``b += u_n * e / mean(c)``

with ``u_n = u`` (constant), ``u / sqrt(n)`` (inv_sqrt) or ``u / n`` (inv) at the n-th update,
and optionally ``b -= mean(b)`` (centring; selection is invariant to it). In the primal-dual
view selection is the primal step of the assignment LP with capacity T*K/E per expert,
``-b`` is the dual price and each update is one dual sub-gradient step. Both rules are
invariant to a common scale of ``c``, so ranks that see replicated tokens (tensor or
sequence parallel groups inside ``group``) do not change the update.

Counting happens in a forward hook on each router, without grad, only in training mode and
never inside a backward pass, so activation-checkpoint recomputation (reentrant or not)
counts each token once. Counts feed the update only after the step that produced them, so
no token's routing depends on its own (or any later) token's count.

Public API: :class:`AuxFreeBalancingConfig`, :class:`AuxFreeBalancer` (hooks for a torch
optimizer and the DeepSpeed engine), ``AuxFreeBalancerCallback`` (HF Trainer; transformers is
imported on first use), :func:`max_vio`, :func:`evaluate_max_vio`, :func:`step_size`,
:func:`bias_delta`, :func:`find_balanced_routers`, :class:`ExpertLoadCounter`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megamoe.config import check_fields, from_dict, spec, to_dict

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


def max_vio(counts_E: Tensor) -> Tensor:
    """MaxVio = (max_e c_e - mean c) / mean c over the last dim (0 where nothing was routed).

    Works on one layer's ``[E]`` or stacked ``[L, E]`` counts and returns fp64.
    """
    c = counts_E.to(torch.float64)
    mean = c.mean(dim=-1)
    return torch.where(mean > 0, (c.amax(dim=-1) - mean) / mean.clamp_min(1e-300), torch.zeros_like(mean))


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


def _in_backward() -> bool:
    # The autograd engine sets a graph task id on the thread only while it executes a backward
    # pass; checkpoint recomputation (reentrant or not) always runs inside one.
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def find_balanced_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, router)`` for every router in ``model`` that supports a selection bias, in
    module order (identical on every rank for identical models)."""
    found = []
    for name, module in model.named_modules():
        if callable(getattr(module, "enable_selection_bias", None)):
            found.append((name, module))
    return found


class ExpertLoadCounter:
    """Accumulates selected slots per expert in the forward of a list of routers.

    A forward hook adds ``decision.selected_counts_E`` (before capacity drops: the load the
    router *asked* for, which is what balancing controls) into one flat fp64 vector ``[F]``,
    so one all-reduce covers every layer. Counts only when ``enabled``, never inside a
    backward pass (checkpoint recompute), and with ``training_only`` only for routers in
    training mode. Use as a context manager to remove the hooks on exit.
    """

    def __init__(self, routers: Iterable[nn.Module], *, training_only: bool = True) -> None:
        self.routers = list(routers)
        self.sizes = [int(r.num_experts) for r in self.routers]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        device = next((p.device for r in self.routers for p in r.parameters()), torch.device("cpu"))
        self.counts_F = torch.zeros(sum(self.sizes), dtype=torch.float64, device=device)
        self.training_only = training_only
        self.enabled = True
        self.forward_calls = 0
        self._handles = [r.register_forward_hook(self._make_hook(i)) for i, r in enumerate(self.routers)]

    def _make_hook(self, index: int) -> Callable[..., None]:
        lo, hi = self.offsets[index], self.offsets[index] + self.sizes[index]

        def hook(module: nn.Module, args: Any, decision: Any) -> None:
            if not self.enabled or (self.training_only and not module.training) or _in_backward():
                return
            counts_E = decision.selected_counts_E.detach()
            if counts_E.device != self.counts_F.device:
                # Follow the model if it moved (model.to(...) after construction).
                self.counts_F = self.counts_F.to(counts_E.device)
            with torch.no_grad():
                self.counts_F[lo:hi] += counts_E.to(torch.float64)
            self.forward_calls += 1

        return hook

    def per_layer(self, counts_F: Tensor | None = None) -> list[Tensor]:
        flat = self.counts_F if counts_F is None else counts_F
        return [flat[o:o + s] for o, s in zip(self.offsets, self.sizes)]

    def take(self) -> Tensor:
        """Return the accumulated counts and reset the accumulator."""
        out = self.counts_F.clone()
        self.counts_F.zero_()
        self.forward_calls = 0
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ExpertLoadCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over ``group`` (a no-op without an initialised process group)."""
    if _group_size(group) == 1:
        return t
    # gloo cannot reduce CUDA tensors; counts are tiny, so a host round trip is cheap.
    staged = t.cpu() if (t.is_cuda and dist.get_backend(group) == "gloo") else t
    dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
    return staged.to(t.device)


class AuxFreeBalancer:
    """Auxiliary-loss-free load balancing for every bias-capable router of ``model``.

    Args:
        model: searched for routers with ``enable_selection_bias()`` (top-k routers); their
            bias buffers are created (zero) if absent, so build the balancer *before* loading a
            checkpoint that contains ``...router.expert_bias`` entries.
        config: the update rule; defaults to DeepSeek's sign rule with u = 1e-3.
        group: the ranks whose tokens are counted (default WORLD: every data- and
            expert-parallel rank routes its own tokens, so summing the routers' local counts
            over all ranks gives the global count whatever the dispatcher is). Constructing
            the balancer and :meth:`update` are collective over ``group``.

    Call :meth:`update` once per optimizer step, or let a hook do it
    (:meth:`attach_to_optimizer`, :meth:`attach_to_deepspeed`, ``AuxFreeBalancerCallback``).
    """

    def __init__(self, model: nn.Module, config: AuxFreeBalancingConfig | None = None, *,
                 group: Any = None) -> None:
        self.config = config or AuxFreeBalancingConfig()
        if not isinstance(self.config, AuxFreeBalancingConfig):
            raise TypeError(f"config must be an AuxFreeBalancingConfig, got {type(self.config).__name__}")
        self.group = group
        found = find_balanced_routers(model)
        if not found:
            raise ValueError(
                "AuxFreeBalancer found no router supporting enable_selection_bias() in the model; "
                "ALF-LB needs MoE layers with a top-k router (RouterConfig.name='topk')")
        self.layer_names = [name for name, _ in found]
        self.routers = [router for _, router in found]
        for router in self.routers:
            router.enable_selection_bias()
            if getattr(router.config, "aux_loss_coef", 0) > 0:
                warnings.warn(f"router {router.config.name!r} also has aux_loss_coef="
                              f"{router.config.aux_loss_coef}: ALF-LB is meant to replace the auxiliary "
                              "loss (set RouterConfig.aux_loss_coef=0)", stacklevel=2)
                break
        self.counter = ExpertLoadCounter(self.routers, training_only=True)
        self.num_updates = 0
        self.last_metrics: dict[str, float] = {}
        self._deepspeed_engine: Any = None
        self.sync_biases()

    # ------------------------------------------------------------------ state
    def biases(self) -> dict[str, Tensor]:
        """Layer name -> the live bias buffer [E]."""
        return {name: router.expert_bias for name, router in zip(self.layer_names, self.routers)}

    @torch.no_grad()
    def sync_biases(self) -> None:
        """Make every rank's biases equal to group rank 0's (one broadcast; collective)."""
        if _group_size(self.group) == 1:
            return
        flat = torch.cat([r.expert_bias.detach().reshape(-1) for r in self.routers])
        staged = flat.cpu() if (flat.is_cuda and dist.get_backend(self.group) == "gloo") else flat
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(staged, src=src, group=self.group)
        for router, part in zip(self.routers, torch.split(staged, self.counter.sizes)):
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

    # ---------------------------------------------------------------- counting
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not counted (e.g. extra train-mode passes)."""
        before = self.counter.enabled
        self.counter.enabled = False
        try:
            yield
        finally:
            self.counter.enabled = before

    def discard_pending(self) -> None:
        """Drop the counts accumulated since the last update (a training step that was not applied)."""
        self.counter.take()

    def pending_counts(self) -> dict[str, Tensor]:
        """This rank's counts accumulated since the last update (layer name -> [E])."""
        return dict(zip(self.layer_names, (c.clone() for c in self.counter.per_layer())))

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """One ALF-LB step from the counts since the last call: all-reduce, move biases, reset.

        Collective over ``group``. Returns ``alflb/max_vio_batch/<layer>`` (MaxVio of this
        step's global counts), ``alflb/max_vio_batch`` (mean over layers), ``alflb/step_size``,
        ``alflb/bias_abs_max`` and ``alflb/slots`` (global selected slots of the first layer).
        If no rank counted any token since the last update, the biases stay as they are.
        """
        counts_F = _all_reduce_sum(self.counter.take(), self.group)
        per_layer = self.counter.per_layer(counts_F)
        if not bool(counts_F.sum() > 0):
            self.last_metrics = {"alflb/slots": 0.0}
            return dict(self.last_metrics)
        self.num_updates += 1
        for router, c_E in zip(self.routers, per_layer):
            bias = router.expert_bias
            bias.add_(bias_delta(c_E, self.config, self.num_updates).to(bias.device))
            if self.config.center:
                bias.sub_(bias.mean())
        vio_L = torch.stack([max_vio(c) for c in per_layer])
        abs_max = torch.stack([r.expert_bias.detach().abs().max().to(vio_L.device, torch.float64)
                               for r in self.routers]).max()
        values = torch.cat([vio_L, vio_L.mean().reshape(1), abs_max.reshape(1),
                            per_layer[0].sum().reshape(1)]).tolist()  # one host sync
        metrics = {f"alflb/max_vio_batch/{name}": v for name, v in zip(self.layer_names, values)}
        metrics.update({"alflb/max_vio_batch": values[-3], "alflb/bias_abs_max": values[-2],
                        "alflb/slots": values[-1], "alflb/step_size": step_size(self.config, self.num_updates)})
        self.last_metrics = metrics
        return dict(metrics)

    # ------------------------------------------------------------------- hooks
    def attach_to_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run :meth:`update` after every ``optimizer.step()``; returns the removable handle.

        With gradient accumulation the optimizer steps once per accumulated batch, so every
        micro-batch's tokens land in one update. (A step that an AMP GradScaler skips does
        not call the hook; its counts roll into the next update.)
        """
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None:
            raise TypeError(f"attach_to_optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                            "for a DeepSpeed engine use attach_to_deepspeed(engine)")
        return register(lambda opt, args, kwargs: self.update())

    def attach_to_deepspeed(self, engine: Any) -> None:
        """Run :meth:`update` after each ``engine.step()`` that is a real optimizer step.

        ``engine.step()`` is called every micro-batch; only the call that crosses a gradient
        accumulation boundary advances ``engine.global_steps`` (whether or not an fp16
        overflow skipped the weight update, the tokens were routed), and only that call
        updates the biases. The pipeline engine (``train_batch``) is not hooked: build the
        balancer on the stage's module with ``group`` = the stage's data-parallel group and
        call :meth:`update` after ``train_batch()``.
        """
        if self._deepspeed_engine is not None:
            raise RuntimeError("this AuxFreeBalancer is already attached to a DeepSpeed engine")
        if not hasattr(engine, "global_steps") or not callable(getattr(engine, "step", None)):
            raise TypeError(f"attach_to_deepspeed needs a deepspeed engine, got {type(engine).__name__}")
        if type(engine).__name__ == "PipelineEngine":
            raise TypeError("attach_to_deepspeed does not hook PipelineEngine.train_batch; construct the "
                            "balancer with group=<the stage's data-parallel group> and call update() after "
                            "each train_batch()")
        original = engine.step

        def step(*args: Any, **kwargs: Any) -> Any:
            before = engine.global_steps
            result = original(*args, **kwargs)
            if engine.global_steps != before:
                self.update()
            return result

        engine.step = step  # instance attribute shadows the bound method
        self._deepspeed_engine = engine

    def close(self) -> None:
        """Remove the counting hooks (the biases stay in the model and keep steering selection)."""
        self.counter.remove()


@torch.no_grad()
def evaluate_max_vio(model: nn.Module, batches: Iterable[Any], *,
                     forward: Callable[[nn.Module, Any], Any] | None = None,
                     group: Any = None) -> dict[str, float]:
    """MaxVio_global over a held-out set: counts of all batches (and all ranks of ``group``)
    summed per layer before taking MaxVio, with the current biases, in eval mode.

    forward: ``forward(model, batch)``; defaults to ``model(batch)``.
    Returns ``max_vio_global/<layer>`` and ``max_vio_global`` (mean over layers). Collective
    over ``group``. Balancer counters are not touched (they count training-mode passes only).
    """
    routers = find_balanced_routers(model)
    if not routers:
        raise ValueError("evaluate_max_vio found no router supporting enable_selection_bias() in the model")
    names = [n for n, _ in routers]
    was_training = model.training
    model.eval()
    try:
        with ExpertLoadCounter([r for _, r in routers], training_only=False) as counter:
            for batch in batches:
                model(batch) if forward is None else forward(model, batch)
            counts_F = _all_reduce_sum(counter.take(), group)
            per_layer = counter.per_layer(counts_F)
    finally:
        model.train(was_training)
    vio = torch.stack([max_vio(c) for c in per_layer])
    values = torch.cat([vio, vio.mean().reshape(1)]).tolist()
    out = {f"max_vio_global/{n}": v for n, v in zip(names, values)}
    out["max_vio_global"] = values[-1]
    return out


def _make_callback_class() -> type:
    from transformers import TrainerCallback

    class AuxFreeBalancerCallback(TrainerCallback):
        """HF Trainer hook: one ALF-LB update per optimizer step (``on_step_end`` fires only at
        gradient-accumulation boundaries). Its metrics are added to ``state.log_history`` and to
        the logs that callbacks registered after this one see.

        Pass a ready :class:`AuxFreeBalancer`, or a config (the balancer is then built on the
        Trainer's model at ``on_train_begin``; build it yourself if you resume from a
        checkpoint, so the bias buffers exist before the weights load).
        """

        def __init__(self, balancer: AuxFreeBalancer | AuxFreeBalancingConfig | None = None, *,
                     group: Any = None) -> None:
            if isinstance(balancer, AuxFreeBalancer):
                self.balancer: AuxFreeBalancer | None = balancer
                self._config = balancer.config
            elif balancer is None or isinstance(balancer, AuxFreeBalancingConfig):
                self.balancer = None
                self._config = balancer or AuxFreeBalancingConfig()
            else:
                raise TypeError("AuxFreeBalancerCallback takes an AuxFreeBalancer or an AuxFreeBalancingConfig, "
                                f"got {type(balancer).__name__}")
            self._group = group

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            resuming = state.global_step > 0
            if self.balancer is None:
                if resuming:
                    # The Trainer loaded the checkpoint before this hook, into a model without bias
                    # buffers, so the saved biases were dropped; building now would restart at zero.
                    raise RuntimeError(
                        "AuxFreeBalancerCallback: resuming from a checkpoint needs the biases to exist before "
                        "the weights load; build AuxFreeBalancer(model, config) before Trainer(...) and pass "
                        "it to AuxFreeBalancerCallback(balancer)")
                if model is None:
                    raise RuntimeError("AuxFreeBalancerCallback: the Trainer passed no model to on_train_begin")
                self.balancer = AuxFreeBalancer(model, self._config, group=self._group)
            if resuming and self.balancer.num_updates == 0:
                # One update per optimizer step: the schedule continues where the run stopped.
                self.balancer.num_updates = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            assert self.balancer is not None, "on_train_begin builds the balancer"
            self.balancer.update()

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Trainer.log has already appended a copy of ``logs`` to log_history and shown it to
            # the callbacks registered before this one (reporting integrations come first), so
            # the metrics are added to both the live dict and that history entry.
            if logs is None or self.balancer is None or "loss" not in logs:
                return
            metrics = dict(self.balancer.last_metrics)
            logs.update(metrics)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(metrics)

    return AuxFreeBalancerCallback


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # PEP 562: the HF callback subclasses transformers.TrainerCallback, imported on first use only.
    if name == "AuxFreeBalancerCallback":
        if name not in _LAZY:
            _LAZY[name] = _make_callback_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AuxFreeBalancingConfig", "AuxFreeBalancer", "AuxFreeBalancerCallback", "ExpertLoadCounter",
           "bias_delta", "evaluate_max_vio", "find_balanced_routers", "max_vio", "step_size", "UPDATES",
           "SCHEDULES"]
