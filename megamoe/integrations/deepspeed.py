"""DeepSpeed glue for models holding megamoe layers: optimizer groups, engine, checkpoints.

Shape legend: E experts of a layer, E_local = E / ep_size experts held by one rank.

Use::

    groups = build_expert_parallel_groups(ep_size)          # every rank
    apply_expert_parallel(model, groups)                     # keep this rank's experts
    engine = megamoe.integrations.deepspeed.initialize(model, ds_config, groups)
    loss = engine(batch); engine.backward(loss); engine.step()
    save_checkpoint(engine, "ckpt")                          # every rank
    client_state = load_checkpoint(engine, "ckpt")           # any EP size

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
  with one that counts every dense parameter once and every expert exactly once.
  ZeRO-1/2 and bf16 already compute the global norm that way.
- Each MoELayer's aux-loss gradient is scaled by 1/gradient_accumulation_steps, like the
  main loss, and under fp16 also by the current dynamic loss scale (read before every
  forward, so the scale halved after a skipped overflow step applies to the next one).
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

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`, every ZeRO stage) hold DeepSpeed's own files
(optimizer, ZeRO shards, LR scheduler, client state) plus a ``megamoe/`` folder with the
dense weights (rank 0) and each EP rank's expert slices, and ``meta.json`` describing the
layout, plus the optimizer state in a layout-independent form: per parameter name, each
element-wise state tensor whole (experts: per EP rank with the expert dimension first), the
other state (Adam's step) and each group's hyperparameters (the LR in effect). Loading at the
same world size, EP size and ZeRO stage goes through DeepSpeed's own files. At any other EP
size, world size or ZeRO stage (0-2) the experts are resharded, the weights, step counter, LR
scheduler and client state are restored, and each rank's optimizer state (Adam moments,
step, LR) is rebuilt from the per-name form, so the continued run equals the uninterrupted
one. :func:`load_full_state_dict` / :func:`load_full_optimizer_state` consolidate a
checkpoint into the single-process model's state dict / optimizer state. Under bf16 the
fp32 master weights are re-copied from the bf16 module weights at another layout.
Under ZeRO-3 the megamoe weight files hold whole tensors (gathered one parameter at a time,
:func:`module_state_dict`), so they are read the same way at any stage; loading a ZeRO-3 run
at another layout copies the weights into the partitions and the fp32 master weights, but
its optimizer state is not in the layout-independent form yet and **restarts from zero**.
Each checkpoint directory is written through megamoe's staged protocol and sealed by a sha256
manifest of all its files, DeepSpeed's included (:mod:`megamoe.checkpoint.staged`); every
loader verifies it first (:func:`verify_checkpoint`) and names a missing or changed file.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import types
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from megamoe.atomic import atomic_torch_save, atomic_write_text
from megamoe.parallel import ExpertParallelGroups, is_expert_param, moe_layers

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
CHECKPOINT_FORMAT = 1
MEGAMOE_DIR = "megamoe"
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


def _check_model(model: nn.Module, groups: ExpertParallelGroups) -> None:
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model holds no megamoe MoELayer; use deepspeed.initialize directly")
    for name, layer in layers:
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


def _track_loss_scale(engine) -> None:
    """Scale every MoELayer's aux-loss gradient by the current fp16 loss scale.

    ``engine.backward`` multiplies the main loss by the loss scale S (and 1/GAS) and the
    optimizer divides all gradients by S before the update, so the aux loss, which enters
    autograd beside the loss, must be fed S/GAS too. S changes only inside ``engine.step()``
    (halved after an overflow, whose step is skipped and whose gradients are discarded;
    raised after a window without one), so reading it before every forward is enough.
    """
    layers = [layer for _, layer in moe_layers(engine.module)]
    gas = engine.gradient_accumulation_steps()

    def set_scale(module, args):
        scale = current_loss_scale(engine) / gas
        for layer in layers:
            layer.aux_loss_grad_scale = scale

    engine.module.register_forward_pre_hook(set_scale)


def _join_deepspeed_comm() -> None:
    """``deepspeed.init_distributed`` over the existing torch process group.

    On the CPU DeepSpeed builds (or loads) a shared-memory op and prints "... built
    successfully" on every start; that line is held back unless the call fails.
    """
    import deepspeed

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            deepspeed.init_distributed(dist_backend=dist.get_backend())
    except BaseException:
        sys.stdout.write(captured.getvalue())
        raise


def initialize(model: nn.Module, ds_config: Mapping[str, Any] | str | os.PathLike, groups: ExpertParallelGroups,
               **kw: Any):
    """``deepspeed.initialize`` for a model whose MoE layers are sharded by ``groups``.

    ds_config: a DeepSpeed config dict, or the path of a JSON (or YAML) file holding one.
    Keyword arguments go to ``deepspeed.initialize``. Without ``model_parameters`` or
    ``optimizer`` the parameter groups come from :func:`moe_param_groups` (weight decay
    from ``ds_config["optimizer"]["params"]["weight_decay"]``). Returns the engine
    (the optimizer, data loader and scheduler are attributes of it).
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
    _check_model(model, groups)
    _join_deepspeed_comm()
    register_groups_with_deepspeed(groups)
    if "model_parameters" not in kw and not isinstance(kw.get("optimizer"), torch.optim.Optimizer):
        # An optimizer *callable* is handed these groups by DeepSpeed, so it gets the MoE
        # groups too; only a ready-made optimizer brings its own (checked by DeepSpeed).
        wd = float(((ds_config.get("optimizer") or {}).get("params") or {}).get("weight_decay", 0.0))
        kw["model_parameters"] = moe_param_groups(model, weight_decay=wd)
    for _, layer in moe_layers(model):
        # Read by DeepSpeed's MoE bookkeeping (engine.num_experts).
        layer.num_experts = layer.config.num_experts
    if _zero_stage(ds_config) == 3:
        # Without DeepSpeed's MoE bookkeeping (it refuses its native MoE under stage 3);
        # the placement attributes carry the expert semantics instead.
        _place_zero3_params(model, groups)
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kw)
    else:
        with _deepspeed_recognises_megamoe():
            engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kw)
    gas = engine.gradient_accumulation_steps()
    for _, layer in moe_layers(model):
        layer.aux_loss_grad_scale = 1.0 / gas
    if engine.fp16_enabled():
        _track_loss_scale(engine)
    if _zero_stage(ds_config) == 0 and not engine.bfloat16_enabled():
        _install_global_clip(engine, groups)
    engine.megamoe_groups = groups
    return engine


# --------------------------------------------------------------------------- checkpoints
def _expert_keys(model: nn.Module) -> dict[str, int]:
    """State-dict key of every expert tensor -> the layer's total number of experts."""
    keys = {}
    for name, layer in moe_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        for pname, _ in layer.experts.named_parameters():
            keys[prefix + pname] = layer.config.num_experts
    return keys


def module_state_dict(engine) -> dict[str, torch.Tensor]:
    """This rank's module state dict on CPU (its expert slices), with whole tensors.

    Under ZeRO-3 the parameters are gathered one at a time (a collective: every rank must
    call it), so no rank ever holds more than one whole parameter beyond its partitions.
    """
    model = engine.module
    if not engine.zero_optimization_partition_weights():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    import deepspeed

    state = model.state_dict(keep_vars=True)
    params = {id(p): p for p in model.parameters()}
    out = {}
    for key, value in state.items():
        if id(value) in params:
            with deepspeed.zero.GatheredParameters([value]):
                out[key] = value.detach().cpu().clone()
        else:
            out[key] = value.detach().cpu()
    return out


def _load_module_state(engine, local: dict[str, torch.Tensor], ckpt: str) -> None:
    """Copy ``local`` into the module; under ZeRO-3 into each partition, then the master weights."""
    model = engine.module
    if not engine.zero_optimization_partition_weights():
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(local, strict=False)
        if missing or unexpected:
            raise ValueError(f"{ckpt} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        return
    import deepspeed

    state = model.state_dict(keep_vars=True)
    missing = sorted(state.keys() - local.keys())
    unexpected = sorted(local.keys() - state.keys())
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    params = {id(p) for p in model.parameters()}
    with torch.no_grad():
        for key, value in state.items():
            if id(value) in params:
                # Every rank holds the same ``local`` values, so partition-group rank 0's copy
                # (broadcast on exit, then re-partitioned) is everyone's.
                with deepspeed.zero.GatheredParameters([value], modifier_rank=0):
                    value.data.copy_(local[key].to(value.device, value.dtype))
            else:
                value.copy_(local[key])
    engine.optimizer.refresh_fp32_params()


def _read_latest(load_dir: str) -> str:
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tag given and {path} does not exist; pass tag= or point at a checkpoint "
                                "directory written by megamoe.integrations.deepspeed.save_checkpoint")
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def save_checkpoint(engine, save_dir: str, tag: str | None = None, client_state: dict | None = None) -> str:
    """Save through the engine plus megamoe's reshardable weights. Every rank must call it.

    Written through the staged protocol (:mod:`megamoe.checkpoint.staged`): every rank writes
    into ``save_dir/.<tag>.staging/<tag>``, the ranks seal it with a sha256 manifest, rank 0
    swaps it in as ``save_dir/<tag>`` (an earlier one of that tag is replaced only then) and
    replaces ``save_dir/latest`` atomically. Refused (``NonFiniteWeightsError``, nothing
    written) when any rank's weights hold NaN or inf. Returns the checkpoint directory.
    """
    from megamoe.checkpoint.integrity import MANIFEST_KEY, MANIFEST_NAME, NonFiniteWeightsError, nonfinite_message
    from megamoe.checkpoint.staged import StagedDirectory, run_agreed

    groups: ExpertParallelGroups = engine.megamoe_groups
    tag = tag or f"global_step{engine.global_steps}"
    if os.sep in tag or tag.startswith("."):
        raise ValueError(f"tag={tag!r} is invalid: it must be a plain directory name")
    rank = dist.get_rank()
    final = os.path.join(save_dir, tag)
    state = module_state_dict(engine)  # collective under ZeRO-3
    bad = _nonfinite_on_any_rank(state)
    if bad:
        raise NonFiniteWeightsError(nonfinite_message(bad, what=f"DeepSpeed checkpoint {final}"))
    with StagedDirectory(final, collective=True) as staged:
        client_state = dict(client_state or {})
        # DeepSpeed writes <dir>/<tag>: give it the staging folder, whose <tag> is the staged copy.
        engine.save_checkpoint(str(staged.container), tag=tag, client_state=client_state, save_latest=False)
        out = os.path.join(str(staged.payload), MEGAMOE_DIR)
        expert_keys = _expert_keys(engine.module)
        # Layout-independent optimizer state (collective); ZeRO-3 partitions are not covered yet.
        has_optimizer_state = (not engine.zero_optimization_partition_weights()
                               and _save_optimizer_state(engine, out, expert_keys))

        def write() -> None:
            os.makedirs(out, exist_ok=True)
            if rank == 0:
                atomic_torch_save({k: v for k, v in state.items() if k not in expert_keys},
                                  os.path.join(out, "dense.pt"))
                sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
                atomic_torch_save({"client_state": client_state, "lr_scheduler": sched,
                                   "global_steps": engine.global_steps, "global_samples": engine.global_samples},
                                  os.path.join(out, "trainer.pt"))
                meta = {"format": CHECKPOINT_FORMAT, "world_size": groups.world_size, "ep_size": groups.ep_size,
                        "zero_stage": engine.zero_optimization_stage(), "expert_keys": expert_keys,
                        "bf16": bool(engine.bfloat16_enabled()), "optimizer_state": has_optimizer_state,
                        MANIFEST_KEY: MANIFEST_NAME}
                atomic_write_text(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
            if groups.edp_rank == 0:
                atomic_torch_save({k: state[k] for k in expert_keys},
                                  os.path.join(out, f"experts_ep{groups.ep_rank:04d}.pt"))

        run_agreed(write, collective=True)
    run_agreed(lambda: atomic_write_text(os.path.join(save_dir, "latest"), tag) if rank == 0 else None,
               collective=True)
    dist.barrier()
    return final


def _nonfinite_on_any_rank(state: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    from megamoe.checkpoint.integrity import nonfinite_tensors

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, nonfinite_tensors(state.items()))
    merged: dict[str, int] = {}
    for part in gathered:
        merged.update(dict(part))
    return sorted(merged.items())


def _read_meta(ckpt: str) -> dict:
    from megamoe.checkpoint.integrity import CheckpointError, read_json

    path = os.path.join(ckpt, MEGAMOE_DIR, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {ckpt} is not a megamoe DeepSpeed checkpoint")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(path, f"checkpoint format {got} is not supported (this megamoe reads format "
                                    f"{CHECKPOINT_FORMAT})")
    missing = [k for k in ("world_size", "ep_size", "zero_stage", "expert_keys") if k not in meta]
    if missing:
        raise CheckpointError(path, f"lacks {missing}: not a complete megamoe checkpoint description")
    return meta


def verify_checkpoint(ckpt: str, *, collective: bool = False) -> None:
    """Check a checkpoint directory (``save_dir/<tag>``) against its manifest; a missing or
    changed file raises ``CheckpointError`` naming it. One written before manifests passes
    with a warning."""
    import warnings

    from megamoe.checkpoint.integrity import unverified_warning, verify_directory

    if not verify_directory(ckpt, marker=f"{MEGAMOE_DIR}/meta.json", collective=collective).verified:
        if not collective or dist.get_rank() == 0:
            warnings.warn(unverified_warning(ckpt), stacklevel=3)


def _resolve(ckpt_dir: str, tag: str | None) -> str:
    return os.path.join(ckpt_dir, tag or _read_latest(ckpt_dir))


def load_full_state_dict(ckpt_dir: str, tag: str | None = None, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the single-process model (all experts local) from a checkpoint.

    Works for any EP size and ZeRO stage 0-3 the checkpoint was written with: dense
    tensors come from rank 0, each expert tensor is the concatenation of the EP ranks'
    slices along the expert dimension. Tensors keep the dtype the module held (fp32, or
    bf16 under bf16 training). ``verify``: check the checkpoint's manifest first (see
    :func:`verify_checkpoint`).
    """
    from megamoe.checkpoint.integrity import CheckpointError, torch_load

    ckpt = _resolve(ckpt_dir, tag)
    if verify:
        verify_checkpoint(ckpt)
    meta = _read_meta(ckpt)
    folder = os.path.join(ckpt, MEGAMOE_DIR)
    state = torch_load(os.path.join(folder, "dense.pt"), map_location="cpu", weights_only=True)
    names = [os.path.join(folder, f"experts_ep{r:04d}.pt") for r in range(meta["ep_size"])]
    shards = [torch_load(n, map_location="cpu", weights_only=True) for n in names]
    for key, num_experts in meta["expert_keys"].items():
        absent = [n for n, sh in zip(names, shards) if key not in sh]
        if absent:
            raise CheckpointError(absent[0], f"has no expert tensor {key!r} (meta.json lists it)")
        full = torch.cat([s[key] for s in shards])
        if full.shape[0] != num_experts:
            raise CheckpointError(ckpt, f"expert tensor {key!r} has {full.shape[0]} experts after merging "
                                        f"{meta['ep_size']} shards, expected {num_experts}")
        state[key] = full
    return state


def _local_state(full: dict[str, torch.Tensor], model: nn.Module, groups: ExpertParallelGroups) -> dict:
    local = dict(full)
    for key, num_experts in _expert_keys(model).items():
        if key not in full:
            raise KeyError(f"checkpoint has no expert tensor {key!r}")
        per_rank = num_experts // groups.ep_size
        local[key] = full[key][groups.ep_rank * per_rank:(groups.ep_rank + 1) * per_rank]
    return local


# --------------------------------------------------------------------------- optimizer state
# Saved per parameter *name*, so any layout can rebuild its own share:
#   optim_dense.pt (rank 0): {"params": {name: entry} for dense parameters, "groups": [...]}
#   optim_experts_ep<r>.pt (EDP rank 0 of EP rank r): {"params": {name: entry}} for its expert slices
# entry = {"tensors": {key: fp32 tensor shaped like the parameter}, "other": {key: value}}:
# element-wise state (Adam's exp_avg, exp_avg_sq) is "tensors" (expert tensors keep the
# expert dimension first, so EP shards concatenate); everything else (Adam's step) is "other".
# "groups" = [{"names": [parameter names], "hyper": {lr, betas, weight_decay, ...}}] in
# optimizer order, so the learning rate in effect at the save is restored with the moments.
OPTIM_DENSE = "optim_dense.pt"
_GROUP_KEYS_KEPT = ("params", "name", "moe")  # layout-specific: never copied from a checkpoint


def _optim_experts_file(ep_rank: int) -> str:
    return f"optim_experts_ep{ep_rank:04d}.pt"


def _flat_partitions(optimizer) -> list[tuple[list[nn.Parameter], torch.Tensor]] | None:
    """(module parameters, this rank's flat fp32 partition) per group for DeepSpeed's ZeRO-1/2 and
    bf16 optimizers, whose base optimizer steps flat partitions; None for a plain torch optimizer."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return list(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups))
    if hasattr(optimizer, "fp32_groups_flat_partition"):
        return list(zip(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition))
    return None


def _has_master_copies(optimizer) -> bool:
    # DeepSpeed's unfused mixed-precision optimizer (bf16 at ZeRO-0): its base optimizer steps
    # one fp32 copy per module parameter (fp32_groups[i][j] for fp16_groups[i][j]).
    return hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups")


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    wrapped = _flat_partitions(optimizer) is not None or _has_master_copies(optimizer)
    return optimizer.optimizer if wrapped else optimizer


def _grouped_params(engine) -> list[tuple[dict, list[str], list[nn.Parameter]]]:
    """(base optimizer group, parameter names, module parameters) per optimizer group.

    Without flat partitions, ``group["params"][j]`` (the tensor the base optimizer keys its
    state by) belongs to the j-th module parameter.
    """
    names = {id(p): n for n, p in engine.module.named_parameters()}
    partitions = _flat_partitions(engine.optimizer)
    base = _base_optimizer(engine.optimizer)
    out = []
    for i, group in enumerate(base.param_groups):
        if partitions is not None:
            params = list(partitions[i][0])
        elif _has_master_copies(engine.optimizer):
            params = list(engine.optimizer.fp16_groups[i])
        else:
            params = list(group["params"])
        out.append((group, [names[id(p)] for p in params], params))
    return out


def _split_entry(state: dict, shape: torch.Size) -> dict:
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == shape}
    return {"tensors": tensors, "other": {k: v for k, v in state.items() if k not in tensors}}


def _gather_optimizer_state(engine, keep: Callable[[str], bool]) -> dict | None:
    """The optimizer state of the parameters ``keep(name)`` selects, whole (experts: this
    rank's slice), keyed by name.

    Collective under ZeRO-1/2 and bf16 (each partitioned tensor is all-reduced over the
    parameter's data-parallel group, dense or expert, one parameter at a time, whether this
    rank keeps it or not). None before the first optimizer step.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state

    partitions = _flat_partitions(engine.optimizer)
    base = _base_optimizer(engine.optimizer)
    if not base.state:
        return None
    params_out: dict[str, dict] = {}
    groups_out = []
    for i, (group, names, params) in enumerate(_grouped_params(engine)):
        groups_out.append({"names": names, "hyper": {k: v for k, v in group.items() if k != "params"}})
        if partitions is None:
            for name, p, stepped in zip(names, params, group["params"]):
                state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                         for k, v in base.state.get(stepped, {}).items()}
                if keep(name):
                    params_out[name] = _split_entry(state, p.shape)
            continue
        flat = partitions[i][1]
        flat_state = base.state.get(flat, {})
        # DeepSpeed links each parameter to its slice of the partition's state once, right after
        # the first group steps, when later groups have no state yet: link again, now.
        lazy_init_hp_params_optimizer_state(params, flat, base.state)
        tensor_keys = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape]
        other = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                 for k, v in flat_state.items() if k not in tensor_keys}
        for name, p in zip(names, params):
            tensors = {k: safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in tensor_keys}
            if keep(name):
                params_out[name] = {"tensors": tensors, "other": dict(other)}
    return {"params": params_out, "groups": groups_out}


def _save_optimizer_state(engine, out: str, expert_keys: dict[str, int]) -> bool:
    """Write this rank's part of the layout-independent optimizer state; True if there was any."""
    groups: ExpertParallelGroups = engine.megamoe_groups
    # Only the ranks that write a tensor keep it: rank 0 the dense state, EDP rank 0 the experts.
    gathered = _gather_optimizer_state(engine, lambda name: (dist.get_rank() == 0 if name not in expert_keys
                                                            else groups.edp_rank == 0))
    if gathered is None:
        return False
    params = gathered["params"]
    if dist.get_rank() == 0:
        atomic_torch_save({"params": {k: v for k, v in params.items() if k not in expert_keys},
                           "groups": gathered["groups"]}, os.path.join(out, OPTIM_DENSE))
    if groups.edp_rank == 0:
        atomic_torch_save({"params": {k: v for k, v in params.items() if k in expert_keys}},
                          os.path.join(out, _optim_experts_file(groups.ep_rank)))
    return True


def load_full_optimizer_state(ckpt_dir: str, tag: str | None = None, *, verify: bool = True) -> dict | None:
    """The optimizer state of the single-process model from a checkpoint, or None if it has none.

    Returns ``{"params": {name: {"tensors": {key: tensor}, "other": {key: value}}}, "groups":
    [{"names": [...], "hyper": {...}}]}``; expert tensors hold all experts (EP shards merged
    along the expert dimension). For Adam, "tensors" holds exp_avg and exp_avg_sq, "other" step.
    """
    from megamoe.checkpoint.integrity import torch_load

    ckpt = _resolve(ckpt_dir, tag)
    if verify:
        verify_checkpoint(ckpt)
    meta = _read_meta(ckpt)
    folder = os.path.join(ckpt, MEGAMOE_DIR)
    if not meta.get("optimizer_state"):
        return None
    dense = torch_load(os.path.join(folder, OPTIM_DENSE), map_location="cpu", weights_only=False)
    shards = [torch_load(os.path.join(folder, _optim_experts_file(r)), map_location="cpu", weights_only=False)["params"]
              for r in range(meta["ep_size"])]
    params = dict(dense["params"])
    for key, num_experts in meta["expert_keys"].items():
        if key not in shards[0]:
            continue  # a frozen expert tensor has no optimizer state
        tensors = {k: torch.cat([s[key]["tensors"][k] for s in shards]) for k in shards[0][key]["tensors"]}
        for k, t in tensors.items():
            if t.shape[0] != num_experts:
                raise ValueError(f"{ckpt}: optimizer state {k!r} of {key!r} has {t.shape[0]} experts after merging "
                                 f"{meta['ep_size']} shards, expected {num_experts}")
        params[key] = {"tensors": tensors, "other": shards[0][key]["other"]}
    return {"params": params, "groups": dense["groups"]}


def _copied(values: dict) -> dict:
    # A ZeRO partition's step is one tensor shared by its parameters in the checkpoint; torch
    # optimizers increment step tensors in place, so every parameter needs its own.
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}


def _restore_optimizer_state(engine, full: dict, ckpt: str) -> None:
    """Rebuild this rank's optimizer state (any EP size, world size, ZeRO stage 0-2) from
    :func:`load_full_optimizer_state`'s output. Not collective."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

    groups: ExpertParallelGroups = engine.megamoe_groups
    expert_keys = _expert_keys(engine.module)
    saved, saved_groups = full["params"], full["groups"]
    group_of = {name: g["hyper"] for g in saved_groups for name in g["names"]}

    def local(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in expert_keys:
            return t
        per_rank = expert_keys[name] // groups.ep_size
        return t[groups.ep_rank * per_rank:(groups.ep_rank + 1) * per_rank]

    partitions = _flat_partitions(engine.optimizer)
    base = _base_optimizer(engine.optimizer)
    grouped = _grouped_params(engine)
    missing = [n for _, names, _ in grouped for n in names if n not in saved]
    if missing:
        raise ValueError(f"{ckpt} has no optimizer state for parameters {missing}; it was saved for another model")
    sd = base.state_dict()
    for i, ((_, names, params), sd_group) in enumerate(zip(grouped, sd["param_groups"])):
        hyper = group_of[names[0]]
        sd_group.update({k: v for k, v in hyper.items() if k not in _GROUP_KEYS_KEPT})
        if partitions is None:
            for index, name in zip(sd_group["params"], names):
                entry = saved[name]
                sd["state"][index] = {**_copied(entry["other"]),
                                      **{k: local(name, t).clone() for k, t in entry["tensors"].items()}}
        else:
            # One flat partition per group: element-wise state starts as zeros of its size and
            # is filled parameter by parameter below (the partition boundaries and padding are
            # DeepSpeed's); the rest (step) is common to the group's parameters.
            (index,) = sd_group["params"]
            flat = partitions[i][1]
            entry = saved[names[0]]
            sd["state"][index] = {**_copied(entry["other"]), **{k: torch.zeros_like(flat) for k in entry["tensors"]}}
    base.load_state_dict(sd)
    if partitions is None:
        return
    for (params, flat), (_, names, _) in zip(partitions, grouped):
        # load_state_dict made new tensors: point each parameter's fragment at them.
        lazy_init_hp_params_optimizer_state(params, flat, base.state)
        for name, p in zip(names, params):
            for k, t in saved[name]["tensors"].items():
                safe_set_full_optimizer_state(p, local(name, t).to(flat.device, flat.dtype), k)
    engine.optimizer._hp_optimizer_states_linked = True


def _apply_scheduler_lr(engine) -> None:
    """Set each optimizer group's LR to the restored scheduler's last LR (torch schedulers)."""
    get_last_lr = getattr(engine.lr_scheduler, "get_last_lr", None)
    groups = engine.optimizer.param_groups
    last = get_last_lr() if get_last_lr is not None else None
    if last is None or len(last) != len(groups):
        return
    for group, lr in zip(groups, last):
        group["lr"] = lr


def load_checkpoint(engine, load_dir: str, tag: str | None = None, *, verify: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, at any EP size; returns client_state.

    Same world size, EP size and ZeRO stage: DeepSpeed restores weights, optimizer state, LR
    scheduler and counters. Otherwise the experts are resharded to this run's EP size and
    weights, LR scheduler, counters, client_state and the optimizer state (moments, step,
    group hyperparameters such as the current LR) are rebuilt for this rank's layout (see
    the module docstring). Checkpoints saved before the first optimizer step hold no
    optimizer state; the optimizer then starts fresh. ``verify``: first check the checkpoint
    against its manifest, the hashing shared by the ranks (a missing or changed file raises
    ``CheckpointError`` naming it on every rank).
    """
    from megamoe.checkpoint.integrity import torch_load

    groups: ExpertParallelGroups = engine.megamoe_groups
    tag = tag or _read_latest(load_dir)
    ckpt = os.path.join(load_dir, tag)
    if verify:
        verify_checkpoint(ckpt, collective=True)
    meta = _read_meta(ckpt)
    same_layout = (meta["world_size"] == groups.world_size and meta["ep_size"] == groups.ep_size
                   and meta["zero_stage"] == engine.zero_optimization_stage())
    trainer = torch_load(os.path.join(ckpt, MEGAMOE_DIR, "trainer.pt"), map_location="cpu", weights_only=False)
    if same_layout:
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {ckpt}")
    full = load_full_state_dict(load_dir, tag, verify=False)
    local = _local_state(full, engine.module, groups)
    zero3 = engine.zero_optimization_partition_weights()
    if not (same_layout and zero3):
        # (At the same layout DeepSpeed has restored ZeRO-3's partitions and master weights.)
        _load_module_state(engine, local, ckpt)
    if not same_layout:
        optimizer = engine.optimizer
        if hasattr(optimizer, "refresh_fp32_params") and not zero3:
            # Master weights were copied from the module at initialize; re-copy them.
            optimizer.refresh_fp32_params()
        full_optimizer = None if zero3 else load_full_optimizer_state(load_dir, tag, verify=False)
        if full_optimizer is not None:  # (a ZeRO-3 engine at another layout restarts its optimizer state)
            _restore_optimizer_state(engine, full_optimizer, ckpt)
        if engine.lr_scheduler is not None and trainer["lr_scheduler"] is not None:
            engine.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
            if full_optimizer is None:
                # No saved group hyperparameters were applied: a scheduler's load_state_dict does not
                # touch the groups, which would keep the schedule's first LR for the next step.
                _apply_scheduler_lr(engine)
        engine.global_steps = trainer["global_steps"]
        engine.global_samples = trainer["global_samples"]
    dist.barrier()
    return trainer["client_state"]


__all__ = ["moe_param_groups", "initialize", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "load_full_state_dict",
           "module_state_dict", "load_full_optimizer_state",
           "validate_ds_config", "register_groups_with_deepspeed", "current_loss_scale", "SUPPORTED_ZERO_STAGES"]
