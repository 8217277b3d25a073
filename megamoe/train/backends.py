"""The two training backends behind one small interface, and the optimizer choice.

Shape legend: B micro batch, S sequence length.

A backend owns the optimizer step: ``train_step(micro_batches_BS)`` runs forward and backward
on each micro batch and one optimizer step, and returns a :class:`StepResult`:
the mean loss over the micro batches on this rank, the gradient norm, and whether the step
was non-finite (a NaN/inf loss on any rank or gradient norm; such a step is not applied) and
where the first non-finite value appeared. ``forward`` runs the model for evaluation;
``save(dir)`` / ``load(dir)`` write and read the backend's share of a checkpoint (every rank
calls them; ``save`` raises on every rank or on none); ``set_lr_schedule(lr)`` makes a resumed
run follow a changed ``train.lr`` or schedule.

- :class:`TorchBackend`: one process, or data parallel over torch.distributed with all
  experts on every rank (gradients averaged by a flat all-reduce, so experts a rank did not
  use this step still agree everywhere). Plain torch optimizer and LambdaLR schedule.
- :class:`DeepSpeedBackend`: expert parallelism from ``megamoe.parallel`` (groups, expert
  sharding), then one ``megamoe.integrations.deepspeed.initialize`` (engine with MoE parameter
  groups, ZeRO, the aux-loss scale through the step state); checkpoints that load across EP
  sizes come from ``megamoe.checkpoint.reshardable``.

Both are built with the run's :class:`~megamoe.train.step_state.MoEStepState` (the trainer ends
its steps); the DeepSpeed backend hands it to the engine, which keeps its aux-loss scale in
line with the fp16 loss scale.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megamoe.config import ConfigError
from megamoe.train.config import LoopConfig, TrainConfig, deepspeed_mapping

OPTIMIZER_IMPLS = ("apex_fused_adam", "torch_adamw_fused", "torch_adamw")


def apex_fused_adam_class():
    """apex.optimizers.FusedAdam, or None when apex is not importable."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken apex build failing at import
        return None
    return FusedAdam


def select_optimizer_impl(device_type: str, *, apex_available: bool) -> str:
    """apex FusedAdam on CUDA when apex is importable, else torch AdamW (fused on CUDA)."""
    if device_type == "cuda":
        return "apex_fused_adam" if apex_available else "torch_adamw_fused"
    return "torch_adamw"


def param_groups(params: Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not norms, biases); existing groups keep their keys."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{"weight_decay": weight_decay, **g} for g in params]
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(params: Iterable[Any], cfg: LoopConfig, *, device_type: str,
                    apex_cls: Any = None) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer chosen by :func:`select_optimizer_impl` and its name.

    apex_cls: the FusedAdam class to use (default: looked up with :func:`apex_fused_adam_class`).
    """
    apex_cls = apex_cls if apex_cls is not None else apex_fused_adam_class()
    impl = select_optimizer_impl(device_type, apex_available=apex_cls is not None)
    groups = param_groups(params, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if impl == "apex_fused_adam":
        return apex_cls(groups, adam_w_mode=True, **kw), impl
    return torch.optim.AdamW(groups, fused=impl == "torch_adamw_fused", **kw), impl


def lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` after ``step`` optimizer steps: linear warmup, cosine decay."""
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


@dataclass
class StepResult:
    """What one optimizer step did.

    loss: mean loss over this rank's micro batches. grad_norm: global gradient norm (before
    clipping; NaN when the backend does not report it).
    nonfinite: the loss (on any rank) or the gradient norm is NaN or inf; the step's update
        was not applied (DeepSpeed ZeRO stage 0 in fp32, which has no such check, excepted).
    overflow: DeepSpeed fp16 dynamic loss scaling skipped the step (by design, not an error).
    where: the first non-finite value found (a module output or a parameter's gradient).
    """

    loss: float
    grad_norm: float
    nonfinite: bool = False
    overflow: bool = False
    where: str | None = None


def _reduce(value: float, op) -> float:
    """``value`` reduced over all ranks with ``op`` (every rank must take the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return float(t.item())


def _any_rank(flag: bool) -> bool:
    return _reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _locate_nonfinite(model: nn.Module, micro_batches: Sequence[Tensor], losses: Sequence[Tensor],
                      forward: Callable[[Tensor], Any], step_state: Any = None) -> str | None:
    """Where the first NaN/inf of a bad step appeared: the first module whose output was
    non-finite when the first micro batch with a non-finite loss (on any rank) is run again
    (no gradient, RNG untouched), else the first non-finite gradient. Collective: every rank
    calls it and re-runs the same micro batch, since expert-parallel forwards communicate."""
    from megamoe.finite import first_nonfinite_grad, first_nonfinite_module

    first_bad = next((i for i, loss in enumerate(losses) if not torch.isfinite(loss).all()), len(losses))
    first_bad = int(_reduce(first_bad, dist.ReduceOp.MIN))
    if first_bad < len(micro_batches):
        x_BS = micro_batches[first_bad]
        # The re-run is not part of the step's load: the step state does not count it.
        paused = step_state.paused() if step_state is not None else contextlib.nullcontext()
        with torch.no_grad(), torch.random.fork_rng(devices=[x_BS.device] if x_BS.is_cuda else []), paused:
            where = first_nonfinite_module(model, lambda: forward(x_BS))
        if where:
            return "the output of " + where
    return first_nonfinite_grad(model)


def set_lr_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make a LambdaLR restored from a checkpoint follow peak ``lr`` and its (current) lambda
    from its current step on, instead of the checkpoint's peak."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


class TorchBackend:
    """Single process, or data parallel over the default process group (EP = 1)."""

    name = "torch"

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, device: torch.device, step_state: Any = None) -> None:
        self.model = model.to(device)
        self.cfg, self.device, self.step_state = cfg, device, step_state
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.world > 1:
            # Identical start on every rank, whatever each rank's RNG did before.
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, src=0)
        self.optimizer, self.optimizer_name = build_optimizer(self.model.parameters(), cfg.train,
                                                              device_type=device.type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train))

    def _loss(self, x_BS: Tensor) -> Tensor:
        with _autocast(self.device, self.cfg.train.precision):
            return self.model(x_BS, labels=x_BS).loss

    def train_step(self, micro_batches: Sequence[Tensor]) -> StepResult:
        self.model.train()
        losses = []
        for x_BS in micro_batches:
            loss = self._loss(x_BS)
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach().float())
        if self.world > 1:
            self._average_gradients()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        loss = float(torch.stack(losses).mean())
        result = StepResult(loss, grad_norm, nonfinite=_any_rank(not (_finite(loss) and _finite(grad_norm))))
        if result.nonfinite:  # drop the step: weights, optimizer state and schedule stay as they were
            result.where = _locate_nonfinite(self.model, micro_batches, losses, self._loss, self.step_state)
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def _average_gradients(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
            p.grad = g

    @torch.no_grad()
    def forward(self, x_BS: Tensor) -> Tensor:
        self.model.eval()
        with _autocast(self.device, self.cfg.train.precision):
            return self.model(x_BS, labels=x_BS).loss.float()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr_schedule(self, lr: float) -> None:
        set_lr_schedule(self.scheduler, lr)

    def save(self, directory: str) -> None:
        """Rank 0 writes the (replicated) weights and optimizer; every rank raises if it fails."""
        from megamoe.checkpoint.staged import run_agreed

        def write() -> None:
            if self.rank == 0:
                from safetensors.torch import save_model

                from megamoe.atomic import atomic_torch_save, atomic_write
                atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_model(self.model, tmp))
                atomic_torch_save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                   "optimizer_impl": self.optimizer_name}, os.path.join(directory, "optimizer.pt"))

        run_agreed(write, collective=True)

    def load(self, directory: str) -> None:
        from megamoe.checkpoint.integrity import CheckpointError, load_safetensors_model, torch_load
        path = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"checkpoint {directory!r} has no model.safetensors: it was not written by the torch "
                              "backend (resume it with parallel.backend=deepspeed)")
        load_safetensors_model(self.model, path, device=str(self.device))
        opt_path = os.path.join(directory, "optimizer.pt")
        state = torch_load(opt_path, map_location=self.device, weights_only=False)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(opt_path, f"does not hold this model's optimizer and scheduler state "
                                            f"({type(exc).__name__}: {exc})") from exc


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``: batch, clipping, ZeRO stage and precision derived
    from the megamoe sections, with the user's ``deepspeed`` section merged on top."""
    t = cfg.train
    base: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return _merge(base, deepspeed_mapping(cfg))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend:
    """Expert parallelism + ZeRO: megamoe.parallel shards the experts, then one
    megamoe.integrations.deepspeed.initialize builds the engine."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, device: torch.device, step_state: Any = None) -> None:
        try:
            from megamoe import parallel
            from megamoe.checkpoint import reshardable
            from megamoe.integrations import deepspeed as mds
        except ImportError as exc:
            raise ConfigError(f"parallel.backend='deepspeed' needs megamoe.parallel and "
                              f"megamoe.integrations.deepspeed ({exc}); use parallel.backend=torch") from exc
        self._checkpoints = reshardable
        self.cfg, self.device, self.step_state = cfg, device, step_state
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        groups = parallel.build_expert_parallel_groups(cfg.parallel.ep_size)
        found = list(zip(step_state.layer_names, step_state.layers)) if step_state is not None else None
        self.model = parallel.apply_expert_parallel(model, groups, layers=found).to(device)
        ds_cfg = deepspeed_config(cfg, self.world)
        kw: dict[str, Any] = {}
        self.optimizer_name = "deepspeed-config"
        if "optimizer" not in ds_cfg:
            # DeepSpeed calls these with the engine's (MoE-aware) parameter groups.
            def make_optimizer(params):
                opt, self.optimizer_name = build_optimizer(params, cfg.train, device_type=device.type)
                return opt
            kw["optimizer"] = make_optimizer
        if "scheduler" not in ds_cfg:
            kw["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train))
        self.engine = mds.initialize(self.model, ds_cfg, groups, step_state=step_state,
                                     weight_decay=cfg.train.weight_decay, **kw)

    def train_step(self, micro_batches: Sequence[Tensor]) -> StepResult:
        self.engine.train()
        losses = []
        skipped_before = self.engine.skipped_steps
        for x_BS in micro_batches:
            loss = self.engine(x_BS, labels=x_BS).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        loss = float(torch.stack(losses).mean())
        # ZeRO 1-3 and the bf16 optimizer drop a step whose gradients hold NaN/inf (reporting an
        # inf norm); under fp16 that is the loss scaler's overflow, which it handles by design.
        dropped = self.engine.skipped_steps > skipped_before
        if self.cfg.train.precision == "fp16" and dropped:
            return StepResult(loss, norm, overflow=True)
        bad = _any_rank(not _finite(loss)) or dropped or (self.engine.get_global_grad_norm() is not None
                                                          and not _finite(norm))
        result = StepResult(loss, norm, nonfinite=bad)
        if bad:
            result.where = _locate_nonfinite(self.model, micro_batches, losses,
                                             lambda x_BS: self.engine(x_BS, labels=x_BS).loss, self.step_state)
        return result

    @torch.no_grad()
    def forward(self, x_BS: Tensor) -> Tensor:
        self.engine.eval()
        return self.engine(x_BS, labels=x_BS).loss.float()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def set_lr_schedule(self, lr: float) -> None:
        if not isinstance(self.engine.lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ConfigError("train.lr and the schedule cannot change on resume when the deepspeed section "
                              "defines its own scheduler; resume with the checkpoint's values")
        set_lr_schedule(self.engine.lr_scheduler, lr)

    def save(self, directory: str) -> None:
        # ``directory`` is the trainer's staged checkpoint: the engine folder is written in place.
        self._checkpoints.save_checkpoint(self.engine, directory, tag="engine", staged=False)

    def load(self, directory: str) -> None:
        # The trainer has verified the whole checkpoint, the engine folder included.
        self._checkpoints.load_checkpoint(self.engine, directory, tag="engine", verify=False)


def build_backend(model: nn.Module, cfg: TrainConfig, *, device: torch.device, step_state: Any = None):
    cls = TorchBackend if cfg.parallel.backend == "torch" else DeepSpeedBackend
    return cls(model, cfg, device=device, step_state=step_state)
