"""DeepSpeed engine glue for models holding megamoe layers: groups, parameter tags, ZeRO-3
leaf modules, the aux-loss scale under fp16 loss scaling, clipping, and the per-step hook.

Shape legend: E experts of a layer, E_local = E / ep_size experts held by one rank.

Use::

    groups = build_expert_parallel_groups(ep_size)          # every rank
    apply_expert_parallel(model, groups)                     # keep this rank's experts
    engine = megamoe.integrations.deepspeed.initialize(model, ds_config, groups)
    loss = engine(batch); engine.backward(loss); engine.step()

Checkpoints that load at any EP size, world size or ZeRO stage are in
:mod:`megamoe.checkpoint.reshardable` (``save_checkpoint(engine, dir)``,
``load_checkpoint(engine, dir)``).

What the glue does, and why:

- Expert parameters carry ``allreduce=False`` and ``group_name="ep_size_<n>"`` (set by
  ``apply_expert_parallel``) and sit in optimizer groups with ``moe=True``
  (:func:`moe_param_groups`); megamoe's EP/EDP groups are registered in DeepSpeed's group
  registry under that name. DeepSpeed then reduces (and for ZeRO-1/2 partitions) expert
  gradients over the expert-data-parallel group, dense gradients over all ranks, and
  divides both by the full data-parallel size, so the update equals the single-process
  update on the global batch.
- DeepSpeed only switches its MoE code paths on when it finds its own ``MoE`` module, so
  :func:`initialize` lets it recognise ``MoELayer`` during engine construction.
- ZeRO-0 in fp32: DeepSpeed averages per-rank gradient norms, which is not the global
  norm when ranks hold different experts; :func:`initialize` replaces the engine's clip
  with one that counts every dense parameter once and every expert exactly once (DeepSpeed
  offers no hook there). ZeRO-1/2 and bf16 already compute the global norm that way.
- The per-step state (:class:`megamoe.train.step_state.MoEStepState`) weighs each MoE layer's
  aux-loss gradient by 1/gradient_accumulation_steps, like the main loss, and under fp16 by
  the current dynamic loss scale too (read before every forward by a forward pre-hook on
  the module, so the scale halved after a skipped overflow step applies to the next one).
  :func:`attach_step_state` ends one of its steps per optimizer step through a step
  post-hook of the engine's torch optimizer (no engine method is replaced).
- ZeRO-3: expert parameters are partitioned over the expert-data-parallel group only
  (``ds_zero_partition_process_group``, with DeepSpeed's ``autoep_expert`` placement family
  so their gradients are averaged over the full data-parallel size and their norm summed
  over the EP group), dense ones over all ranks; each MoELayer is a ZeRO-3 leaf module
  (gathered whole before its forward). DeepSpeed's own MoE bookkeeping is not switched on
  for stage 3 (it refuses its native MoE there and expects AutoEP layers).
- fp16 works with ZeRO-1/2/3. fp16 with ZeRO-0 is refused: with DeepSpeed 0.19.8's
  ZeRO-0 fp16 optimizer (FP16_UnfusedOptimizer) under EP=2 the reported gradient norm was
  1% off the global one even without an aux loss, and 112x off with the aux gradient
  multiplied by the loss scale as ZeRO-1/2/3 need (its loss scaling is not applied
  through ``engine.backward``'s ``scale_if_loss``, which only ZeRO optimizers have).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import sys
import types
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from megamoe.checkpoint.staged import run_agreed
from megamoe.parallel import ExpertParallelGroups, is_expert_param
from megamoe.train.step_state import MoEStepState


class _DropCpuFallbackBanner(logging.Filter):
    """DeepSpeed warns "Setting accelerator to CPU ..." on every import in a process without a
    GPU; on a CPU run that is expected, so megamoe drops that one record (and nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


def _own_extension_cache() -> None:
    """In a virtual environment, build DeepSpeed's JIT ops (on the CPU: its shared-memory
    collective, built at every process-group start) in the environment's own folder.

    torch's default cache (``~/.cache/torch_extensions``) is shared by every environment of the
    user; each one compiles against its own torch headers, so two environments rebuild the op
    in turn, and a build killed half-way leaves a lock that makes every later start wait
    forever. A ``TORCH_EXTENSIONS_DIR`` the user set is kept.
    """
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


_own_extension_cache()


def _quiet_deepspeed_noise() -> None:
    """Silence what DeepSpeed makes every run print but the user cannot act on: the CPU
    fallback banner, and the FutureWarnings torch raises (on every call) for the collective
    names DeepSpeed's ZeRO-2/3 still uses."""
    ds_logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logger creates
    if not any(isinstance(f, _DropCpuFallbackBanner) for f in ds_logger.filters):
        ds_logger.addFilter(_DropCpuFallbackBanner())
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)


_quiet_deepspeed_noise()

SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
DEFAULT_NO_DECAY = ("bias", "norm")


# --------------------------------------------------------------------------- param groups
def moe_param_groups(model: nn.Module, *, weight_decay: float = 0.0,
                     no_decay_names: tuple[str, ...] = DEFAULT_NO_DECAY) -> list[dict]:
    """Optimizer parameter groups DeepSpeed needs for expert parallelism.

    Dense and expert parameters go to separate groups; expert groups carry ``moe=True``
    and ``name`` = their ``group_name`` (DeepSpeed keys the EDP group by it). Parameters
    whose name contains one of ``no_decay_names`` and 1-D parameters get weight decay 0.
    Empty groups are left out.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} is invalid: must be >= 0")
    buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay > 0 and p.ndim >= 2 and not any(s in name.lower() for s in no_decay_names)
        expert = getattr(p, "group_name", None) if is_expert_param(p) else None
        if is_expert_param(p) and expert is None:
            raise ValueError(f"parameter {name!r} has allreduce=False but no group_name; mark expert "
                             "parameters with megamoe.parallel.apply_expert_parallel")
        buckets.setdefault((expert, decay), []).append(p)
    groups = []
    for (expert, decay), params in buckets.items():
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if expert is None:
            group["name"] = "dense_decay" if decay else "dense_no_decay"
        else:
            group.update(name=expert, moe=True)
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- engine
def _zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def load_ds_config(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed config as a dict: ``source`` is a mapping, or the path of a ``.json`` file
    (as ``deepspeed.initialize`` accepts) or of a YAML file (any other name)."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"ds_config must be a dict or the path of a JSON/YAML DeepSpeed config, got "
                         f"{type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"ds_config {path!r}: no such file (give a DeepSpeed JSON/YAML config file or a dict)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    from megamoe.config import yaml_load

    try:
        loaded = json.loads(text) if path.endswith(".json") else yaml_load(text)
    except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError: say which file
        raise ValueError(f"ds_config {path!r}: cannot parse the file: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"ds_config {path!r}: the file must hold a mapping (a DeepSpeed config), got "
                         f"{type(loaded).__name__}")
    return loaded


def validate_ds_config(ds_config: dict) -> None:
    """Refuse DeepSpeed settings megamoe's expert parallelism does not support."""
    if not isinstance(ds_config, dict):
        raise ValueError(f"ds_config must be a dict (a parsed DeepSpeed JSON config), got {type(ds_config).__name__}")
    stage = _zero_stage(ds_config)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage={stage} is not supported with megamoe expert parallelism; "
                         f"supported stages are {', '.join(map(str, SUPPORTED_ZERO_STAGES))}")
    if (ds_config.get("fp16") or {}).get("enabled", False) and stage == 0:
        raise ValueError("fp16.enabled=true with zero_optimization.stage=0 is not supported by "
                         "megamoe.integrations.deepspeed: DeepSpeed's ZeRO-0 fp16 optimizer neither computes the "
                         "global gradient norm under expert parallelism nor loss-scales the way the aux-loss "
                         "gradient needs; use fp16 with zero_optimization.stage 1, 2 or 3, or bf16 / fp32 with any stage")


def register_groups_with_deepspeed(groups: ExpertParallelGroups) -> None:
    """Make DeepSpeed's group registry return megamoe's EP/EDP groups under ``group_name``.

    DeepSpeed would otherwise build its own groups; ours have the same layout, and sharing
    them keeps one set of communicators.
    """
    from deepspeed.utils import groups as ds_groups

    name = groups.group_name
    if groups.ep_group is None:
        raise ValueError("DeepSpeed needs torch.distributed initialised before build_expert_parallel_groups")
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.ep_ranks()
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.edp_ranks()


@contextlib.contextmanager
def _deepspeed_recognises_megamoe() -> Iterator[None]:
    # DeepSpeed decides has_moe_layers by isinstance(module, deepspeed.moe.layer.MoE) inside
    # engine construction; widen that check to MoELayer for the duration of initialize only.
    import deepspeed.runtime.engine as ds_engine

    from megamoe.layer import MoELayer

    original = ds_engine.MoE
    ds_engine.MoE = (original, MoELayer)
    try:
        yield
    finally:
        ds_engine.MoE = original


def _place_zero3_params(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Tell ZeRO-3 to partition expert parameters over the EDP group only.

    DeepSpeed's stage-3 optimizer partitions a parameter over ``ds_zero_partition_process_group``
    when it is set (deepspeed/runtime/zero/partition_parameters.py, ``_convert_to_deepspeed_param``)
    and, for the ``autoep_expert`` placement family, averages its gradient over the full
    data-parallel size and adds its squared gradient norm over the EP group
    (deepspeed/runtime/zero/stage3.py, ``_gradient_averaging_world_size``,
    ``get_grad_norm_direct``): the same semantics as ZeRO-1/2 with ``allreduce=False``.
    Every MoELayer becomes a ZeRO-3 leaf module, so all of its parameters are gathered once
    before its forward (routers with every-expert paths use weights outside submodule calls).
    """
    from deepspeed.utils import set_z3_leaf_modules

    from megamoe.layer import MoELayer

    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            raise ValueError(f"parameter {name!r} is already ZeRO-3 partitioned (built under deepspeed.zero.Init?); "
                             "build the model normally and let initialize partition it, so expert parameters are "
                             "partitioned over the expert-data-parallel group")
        if is_expert_param(p):
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = groups.group_name
            p.ds_zero_partition_process_group = groups.edp_group
    set_z3_leaf_modules(model, [MoELayer])


def _check_sharding(state: MoEStepState, groups: ExpertParallelGroups) -> None:
    for name, layer in zip(state.layer_names, state.layers):
        expected = layer.config.num_experts // groups.ep_size
        marked = all(is_expert_param(p) and getattr(p, "group_name", None) == groups.group_name
                     for p in layer.experts.parameters())
        if layer.experts.num_experts != expected or not marked:
            raise ValueError(f"MoE layer {name!r} is not sharded for ep_size={groups.ep_size}; call "
                             "megamoe.parallel.apply_expert_parallel(model, groups) before initialize")


def _global_grad_norm(engine, groups: ExpertParallelGroups) -> torch.Tensor:
    """sqrt(sum dense g^2 + sum over all experts g^2), identical on every rank.

    After DeepSpeed's reduction dense grads are equal on all ranks and expert grads are
    equal across each EDP group, so the expert part is summed over one EP group only.
    """
    dense = torch.zeros((), dtype=torch.float32)
    expert = torch.zeros((), dtype=torch.float32)
    for p in engine.module.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum().cpu()
        if is_expert_param(p):
            expert += sq
        else:
            dense += sq
    device = next(engine.module.parameters()).device
    expert = expert.to(device)
    if groups.ep_size > 1:
        dist.all_reduce(expert, group=groups.ep_group)
    return (dense.to(device) + expert).sqrt()


def _install_global_clip(engine, groups: ExpertParallelGroups) -> None:
    def clip_fp32_gradients(self) -> None:
        max_norm = float(self.gradient_clipping())
        total = _global_grad_norm(self, groups)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        self._global_grad_norm = float(total)

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)


def current_loss_scale(engine) -> float:
    """The factor ``engine.backward`` multiplies the loss by now (1.0 unless fp16)."""
    if not engine.fp16_enabled():
        return 1.0
    optimizer = engine.optimizer
    config = getattr(optimizer, "loss_scale_config", None)  # FP16_Optimizer / FP16_UnfusedOptimizer (ZeRO-0)
    scale = config.cur_scale if config is not None else getattr(optimizer, "cur_scale", None)  # ZeRO-1/2/3
    if scale is None:
        raise RuntimeError(f"cannot read the fp16 loss scale of {type(optimizer).__name__}")
    return float(scale)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a DeepSpeed optimizer wrapper (ZeRO-1/2/3, bf16 and fp16
    wrappers step an inner ``.optimizer``; ZeRO-0 in fp32 uses the torch optimizer itself)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")
    return inner


def _track_loss_scale(engine, state: MoEStepState) -> None:
    """Keep ``state``'s aux-loss scale at the current fp16 loss scale.

    ``engine.backward`` multiplies the main loss by the loss scale S (and 1/GAS) and the
    optimizer divides all gradients by S before the update, so the aux loss, which enters
    autograd beside the loss, must be fed S/GAS too. S changes only inside ``engine.step()``
    (halved after an overflow, whose step is skipped and whose gradients are discarded;
    raised after a window without one), so reading it before every forward is enough.
    """
    engine.module.register_forward_pre_hook(lambda module, args: state.set_loss_scale(current_loss_scale(engine)))


def attach_step_state(engine, state: MoEStepState) -> Any:
    """End one step of ``state`` (all-reduce the load, move the ALF-LB biases, advance the
    step) per optimizer step of ``engine``; returns the removable hook handle.

    ``engine.step()`` is called every micro-batch; only the call that crosses a gradient
    accumulation boundary steps the torch optimizer, whose step post-hook ends the state's
    step. ZeRO-1/2 step their torch optimizer once per parameter group: the hook ends the
    step once per ``engine.global_steps``. A step DeepSpeed skips (an fp16 overflow) does not
    step the optimizer, so its counts roll into the next step, as a skipped AMP step's do with
    :meth:`MoEStepState.attach_to_optimizer`. The pipeline engine (``train_batch``) is not
    hooked: call ``state.end_step()`` after each ``train_batch()``.
    """
    if type(engine).__name__ == "PipelineEngine":
        raise TypeError("attach_step_state does not hook PipelineEngine.train_batch; build the MoEStepState with "
                        "group=<the stage's data-parallel group> and call end_step() after each train_batch()")
    if not hasattr(engine, "global_steps") or getattr(engine, "optimizer", None) is None:
        raise TypeError(f"attach_step_state needs a deepspeed engine with an optimizer, got {type(engine).__name__}")
    ended = {"at": None}

    def end_step(optimizer, args, kwargs) -> None:
        if ended["at"] == engine.global_steps:  # another parameter group of the same step
            return
        ended["at"] = engine.global_steps
        state.end_step()
        state.begin_step()

    return torch_optimizer(engine.optimizer).register_step_post_hook(end_step)


@contextlib.contextmanager
def _stdout_shown_on_failure() -> Iterator[None]:
    """Hold back what the block prints (DeepSpeed's "... built successfully" lines) unless it raises."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stdout.write(captured.getvalue())
        raise


def _in_turns(fn: Callable[[], Any]) -> None:
    """Call ``fn()`` on every rank of the torch process group, in three turns: rank 0 alone,
    then the first rank of each other host, then all the others together (a collective).

    For one-time work with a per-host on-disk cache, such as a JIT-compiled op: the first turn
    fills the cache, the later ones only read it (or fill their own host's). A failure on any
    rank makes every rank raise (the failed one its own error, the others one naming its rank),
    so no rank waits forever for a turn that will not come.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    host_first = hosts.index(hosts[rank]) == rank
    for mine in (rank == 0, host_first and rank != 0, not host_first):
        run_agreed(fn if mine else (lambda: None), collective=True)


def _build_comm_op_in_turns() -> bool:
    """Build DeepSpeed's CPU shared-memory collective op one process per host at a time.

    ``deepspeed.init_distributed`` JIT-builds it in every process at once on a CPU machine's
    first start; torch's build lock does not stop a rank from importing a half-made or missing
    library there ("deepspeed_shm_comm.so: cannot open shared object file"). Built in turns,
    only the first process compiles and the others load its result. A no-op where DeepSpeed
    needs no such op (GPU accelerators) or has already set up its communication backend.
    Returns whether DeepSpeed's backend setup that follows will use the op.
    """
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if ds_comm.is_initialized():
        return False
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False

    def build() -> None:
        try:
            with _stdout_shown_on_failure():
                builder.load()
        except Exception as exc:
            where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's extension cache")
            raise RuntimeError(f"DeepSpeed could not build its CPU shared-memory op {builder.absolute_name()} "
                               f"(in {where}): {type(exc).__name__}: {exc}. A build killed half-way leaves a "
                               "'lock' file in that folder: remove it and start again") from exc

    _in_turns(build)
    return True


SHM_FOLDER = "/dev/shm"


def _shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU op keeps rank ``rank``'s all-reduce buffer (DeepSpeed 0.19.8 names it
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``; the tests check that the
    installed DeepSpeed still does: with another name the unlink finds nothing and changes nothing)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_FOLDER, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped
    every buffer (a collective).

    DeepSpeed's CPU op creates one ~69 MB buffer per rank in /dev/shm when all ranks share a host
    (``LOCAL_SIZE`` = world size, as the ``deepspeed`` launcher sets) and never removes it: each
    run with a new master port left that much RAM taken until reboot. The mappings the ranks hold
    stay valid after the name is gone, and the memory is returned when the last rank exits,
    however it exits.
    """
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_shm_buffer_path(dist.get_rank()))


def _join_deepspeed_comm() -> None:
    """``deepspeed.init_distributed`` over the existing torch process group: its CPU op built in
    turns first (:func:`_build_comm_op_in_turns`), its shared-memory buffers' names removed after
    (:func:`_unlink_shm_buffer`); the "built successfully" lines it prints on every start are held
    back unless the call fails."""
    import deepspeed

    uses_shm_op = _build_comm_op_in_turns()
    with _stdout_shown_on_failure():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    if uses_shm_op:
        _unlink_shm_buffer()


def initialize(model: nn.Module, ds_config: Mapping[str, Any] | str | os.PathLike, groups: ExpertParallelGroups,
               *, step_state: MoEStepState | None = None, weight_decay: float | None = None, **kw: Any):
    """``deepspeed.initialize`` for a model whose MoE layers are sharded by ``groups``.

    ds_config: a DeepSpeed config dict, or the path of a JSON (or YAML) file holding one.
    step_state: the model's :class:`MoEStepState` (e.g. one with ALF-LB balancing); its
        aux-loss scale follows the engine (accumulation steps, fp16 loss scale), and whoever
        built it ends its steps (:func:`attach_step_state`, or ``end_step()`` in the loop).
        Without one, initialize builds a plain one and attaches it, so router schedules and
        load statistics advance with every optimizer step.
    weight_decay: for the default parameter groups (below); default
        ``ds_config["optimizer"]["params"]["weight_decay"]``, else 0.
    Other keyword arguments go to ``deepspeed.initialize``. Without ``model_parameters`` or
    ``optimizer`` the parameter groups come from :func:`moe_param_groups`. Returns the engine
    (the optimizer, data loader and scheduler are attributes of it; ``engine.megamoe_groups``
    and ``engine.megamoe_step_state`` are megamoe's).
    """
    import deepspeed

    ds_config = load_ds_config(ds_config)
    validate_ds_config(ds_config)
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call megamoe.parallel.init_distributed() (it joins "
                         "a launcher's group, or makes a one-process group) and build the groups with "
                         "megamoe.parallel.build_expert_parallel_groups before initialize")
    if groups.world_size != dist.get_world_size():
        raise ValueError(f"groups were built for world size {groups.world_size}, but the world size is "
                         f"{dist.get_world_size()}")
    own_state = step_state is None
    state = MoEStepState(model) if own_state else step_state  # the one scan for MoE layers
    _check_sharding(state, groups)
    _join_deepspeed_comm()
    register_groups_with_deepspeed(groups)
    if "model_parameters" not in kw and not isinstance(kw.get("optimizer"), torch.optim.Optimizer):
        # An optimizer *callable* is handed these groups by DeepSpeed, so it gets the MoE
        # groups too; only a ready-made optimizer brings its own (checked by DeepSpeed).
        if weight_decay is None:
            weight_decay = float(((ds_config.get("optimizer") or {}).get("params") or {}).get("weight_decay", 0.0))
        kw["model_parameters"] = moe_param_groups(model, weight_decay=weight_decay)
    if _zero_stage(ds_config) == 3:
        # Without DeepSpeed's MoE bookkeeping (it refuses its native MoE under stage 3);
        # the placement attributes carry the expert semantics instead.
        _place_zero3_params(model, groups)
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kw)
    else:
        with _deepspeed_recognises_megamoe():
            engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kw)
    state.set_accumulation_steps(engine.gradient_accumulation_steps())
    if engine.fp16_enabled():
        _track_loss_scale(engine, state)
    if _zero_stage(ds_config) == 0 and not engine.bfloat16_enabled():
        _install_global_clip(engine, groups)
    if own_state:
        attach_step_state(engine, state)
    engine.megamoe_groups = groups
    engine.megamoe_step_state = state
    return engine


__all__ = ["moe_param_groups", "initialize", "attach_step_state", "torch_optimizer", "validate_ds_config",
           "load_ds_config", "register_groups_with_deepspeed", "current_loss_scale", "SUPPORTED_ZERO_STAGES"]
