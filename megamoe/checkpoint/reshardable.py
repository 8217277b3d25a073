"""Reshardable checkpoints of a DeepSpeed engine holding megamoe layers, and its optimizer
state in a layout-independent form.

Shape legend: E experts of a layer, E_local = E / ep_size experts held by one rank.

Use (every rank)::

    save_checkpoint(engine, "ckpt")                          # staged, sealed, swapped in
    client_state = load_checkpoint(engine, "ckpt")           # any EP size, world size, ZeRO stage
    state = load_full_state_dict("ckpt")                     # the single-process model's weights

A checkpoint (``save_dir/<tag>``) holds DeepSpeed's own files (optimizer, ZeRO shards, LR
scheduler, client state) plus a ``megamoe/`` folder with the dense weights (rank 0) and each
EP rank's expert slices, ``meta.json`` describing the layout, and the optimizer state in a
layout-independent form: per parameter name, each element-wise state tensor whole (experts:
per EP rank with the expert dimension first), the other state (Adam's step) and each group's
hyperparameters (the LR in effect). Loading at the same world size, EP size and ZeRO stage
goes through DeepSpeed's own files. At any other EP size, world size or ZeRO stage (0-2) the
experts are resharded, the weights, step counter, LR scheduler and client state are
restored, and each rank's optimizer state (Adam moments, step, LR) is rebuilt from the
per-name form, so the continued run equals the uninterrupted one.
:func:`load_full_state_dict` / :func:`load_full_optimizer_state` consolidate a checkpoint
into the single-process model's state dict / optimizer state. Under bf16 the fp32 master
weights are re-copied from the bf16 module weights at another layout. Under ZeRO-3 the
megamoe weight files hold whole tensors (gathered one parameter at a time,
:func:`module_state_dict`), so they are read the same way at any stage; loading a ZeRO-3 run
at another layout copies the weights into the partitions and the fp32 master weights, but
its optimizer state is not in the layout-independent form yet and **restarts from zero**.

Each checkpoint directory is written through megamoe's staged protocol and sealed by a
sha256 manifest of all its files, DeepSpeed's included (:mod:`megamoe.checkpoint.staged`);
a caller that stages a larger directory around it (the train job's ``step_N``) passes
``staged=False`` and the folder is written in place and sealed. Every loader verifies it
first (:func:`verify_checkpoint`) and names a missing or changed file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from megamoe.atomic import atomic_torch_save, atomic_write_text
from megamoe.checkpoint.integrity import (MANIFEST_KEY, MANIFEST_NAME, CheckpointError, NonFiniteWeightsError,
                                          nonfinite_message, nonfinite_tensors, read_json, torch_load,
                                          unverified_warning, verify_directory)
from megamoe.checkpoint.staged import StagedDirectory, run_agreed, seal
from megamoe.integrations.deepspeed import torch_optimizer
from megamoe.parallel import ExpertParallelGroups
from megamoe.stats import named_moe_layers

CHECKPOINT_FORMAT = 1
MEGAMOE_DIR = "megamoe"


# --------------------------------------------------------------------------- weights
def _expert_keys(model: nn.Module) -> dict[str, int]:
    """State-dict key of every expert tensor -> the layer's total number of experts."""
    keys = {}
    for name, layer in named_moe_layers(model):
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
                                "directory written by megamoe.checkpoint.reshardable.save_checkpoint")
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def save_checkpoint(engine, save_dir: str, tag: str | None = None, client_state: dict | None = None, *,
                    staged: bool = True) -> str:
    """Save through the engine plus megamoe's reshardable weights. Every rank must call it.

    Written through the staged protocol (:mod:`megamoe.checkpoint.staged`): every rank writes
    into ``save_dir/.<tag>.staging/<tag>``, the ranks seal it with a sha256 manifest, rank 0
    swaps it in as ``save_dir/<tag>`` (an earlier one of that tag is replaced only then) and
    replaces ``save_dir/latest`` atomically. ``staged=False``: ``save_dir`` is itself a staged
    copy the caller publishes (the train job's checkpoint): ``<tag>`` is written in place and
    sealed. Refused (``NonFiniteWeightsError``, nothing written) when any rank's weights hold
    NaN or inf. Returns the checkpoint directory.
    """
    tag = tag or f"global_step{engine.global_steps}"
    if os.sep in tag or tag.startswith("."):
        raise ValueError(f"tag={tag!r} is invalid: it must be a plain directory name")
    rank = dist.get_rank()
    final = os.path.join(save_dir, tag)
    state = module_state_dict(engine)  # collective under ZeRO-3
    bad = _nonfinite_on_any_rank(state)
    if bad:
        raise NonFiniteWeightsError(nonfinite_message(bad, what=f"DeepSpeed checkpoint {final}"))
    client_state = dict(client_state or {})
    if staged:
        with StagedDirectory(final, collective=True) as stage:
            # DeepSpeed writes <dir>/<tag>: give it the staging folder, whose <tag> is the staged copy.
            _write(engine, str(stage.container), tag, state, client_state)
    else:
        run_agreed(lambda: os.makedirs(final, exist_ok=True), collective=True)
        _write(engine, save_dir, tag, state, client_state)
        # DeepSpeed copies its recovery scripts beside <tag>, here into the caller's checkpoint;
        # megamoe's reshardable files need none (staged, they go away with the staging folder).
        run_agreed(lambda: _remove_recovery_scripts(save_dir) if rank == 0 else None, collective=True)
        seal(Path(final), collective=True)
    run_agreed(lambda: atomic_write_text(os.path.join(save_dir, "latest"), tag) if rank == 0 else None,
               collective=True)
    dist.barrier()
    return final


DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def _remove_recovery_scripts(directory: str) -> None:
    for name in DEEPSPEED_RECOVERY_SCRIPTS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)


def _write(engine, parent: str, tag: str, state: dict[str, torch.Tensor], client_state: dict) -> None:
    """DeepSpeed's files and megamoe's folder into ``parent/tag`` (collective)."""
    groups: ExpertParallelGroups = engine.megamoe_groups
    rank = dist.get_rank()
    engine.save_checkpoint(parent, tag=tag, client_state=client_state, save_latest=False)
    out = os.path.join(parent, tag, MEGAMOE_DIR)
    expert_keys = _expert_keys(engine.module)
    # Layout-independent optimizer state (collective); ZeRO-3 partitions are not covered yet.
    has_optimizer_state = (not engine.zero_optimization_partition_weights()
                           and _save_optimizer_state(engine, out, expert_keys))

    def write() -> None:
        os.makedirs(out, exist_ok=True)
        if rank == 0:
            atomic_torch_save({k: v for k, v in state.items() if k not in expert_keys}, os.path.join(out, "dense.pt"))
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


def _nonfinite_on_any_rank(state: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, nonfinite_tensors(state.items()))
    merged: dict[str, int] = {}
    for part in gathered:
        merged.update(dict(part))
    return sorted(merged.items())


def _read_meta(ckpt: str) -> dict:
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
    return torch_optimizer(optimizer)


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



__all__ = ["save_checkpoint", "load_checkpoint", "verify_checkpoint", "load_full_state_dict", "module_state_dict",
           "load_full_optimizer_state", "CHECKPOINT_FORMAT", "MEGAMOE_DIR"]
