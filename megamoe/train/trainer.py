"""The training job: process group, data, model, backend, loop, eval, checkpoints, plots.

Shape legend: L MoE layers, E experts, B micro batch, S sequence length.

:func:`run_training` is what ``megamoe train`` calls on every rank. Order of events: the
config is validated against the world size before any process group starts; rank 0
prepares (or reuses) the cached data while the others wait; every rank builds the same model
from the same seed; the backend (torch or deepspeed) wraps it; ``--resume`` restores the
newest complete checkpoint; the loop then runs optimizer steps, logging per step the
all-reduced loss and per-layer expert load (MaxVio), evaluating on the held-out split and
checkpointing every N steps.

Checkpoints live in ``<output_dir>/checkpoints/step_<N>``: every rank writes its share into
a hidden temporary directory that rank 0 renames into place once all ranks are done, so a
kill at any moment leaves either a complete checkpoint or none; only the newest
``keep_last`` are kept. Each holds ``megamoe_config.json`` = {"model": ModelConfig dict,
"train_config": the whole TrainConfig, "step", "backend", "world_size"}, the backend's
files, and one ``rng_rank<r>.pt`` per rank, so a resumed run repeats an uninterrupted run
step for step.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import ConfigError, to_dict
from megamoe.layer import max_violation
from megamoe.train.config import TrainConfig, check_world_size, dump_config, world_size_from_env
from megamoe.train.metrics import MetricsLogger, atomic_write_text, write_plots

CKPT_RE = re.compile(r"^step_(\d+)$")


@dataclass
class RunResult:
    output_dir: str
    final_step: int
    checkpoint: str | None
    final_eval: dict[str, Any] | None
    plots: list[str]


# ----------------------------------------------------------------------------- helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _log(msg: str) -> None:
    if _rank() == 0:
        print(f"[megamoe] {msg}", file=sys.stderr, flush=True)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but CUDA is not available; use train.device=cpu or auto")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    from megamoe.parallel import cuda_device_for_rank
    try:
        index = cuda_device_for_rank(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    except ValueError as exc:
        raise ConfigError(f"{exc} (or set train.device=cpu)") from None
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """The process group: the launcher's, or a one-process group when the DeepSpeed backend
    runs without a launcher (DeepSpeed needs one even for a single process)."""
    if dist.is_initialized() or (world_size == 1 and cfg.parallel.backend == "torch"):
        return
    from megamoe.parallel import init_distributed as start_group
    try:
        start_group(backend=cfg.parallel.dist_backend, device_type=device.type, timeout=timedelta(minutes=30))
    except ValueError as exc:  # dist_backend nccl on a CPU process, or an incomplete launcher environment
        raise ConfigError(f"parallel: {exc}") from None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = CKPT_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, "megamoe_config.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def find_resume_checkpoint(output_dir: str, resume: str) -> str | None:
    """``resume`` = "latest" (newest checkpoint under output_dir, or None) or a checkpoint path."""
    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, "megamoe_config.json")):
            raise ConfigError(f"--resume {resume!r}: not a megamoe checkpoint directory (no megamoe_config.json)")
        return resume
    found = list_checkpoints(os.path.join(output_dir, "checkpoints"))
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- statistics
class StepStats:
    """Per-layer routed-slot counts and losses summed over a step's micro batches."""

    def __init__(self, model) -> None:
        self.layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        self.reset()

    def reset(self) -> None:
        self.counts_LE: torch.Tensor | None = None
        self.aux: torch.Tensor | float = 0.0
        self.calls = 0

    def collect(self) -> None:
        stats = [m.last_stats for m in self.layers]
        if not stats or any(s is None for s in stats):
            return
        # Stays on the device: one host copy per step (in _train_record), not per micro batch.
        counts = torch.stack([s.selected_per_expert_E.detach().float() for s in stats])
        aux = torch.stack([s.aux_loss.detach().float().reshape(()).to(counts.device) for s in stats]).sum()
        self.counts_LE = counts if self.counts_LE is None else self.counts_LE + counts
        self.aux = aux if self.calls == 0 else self.aux + aux
        self.calls += 1


def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place all-reduce of a CPU tensor (through the GPU when the group is NCCL)."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            on_gpu = t.to("cuda")
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t)
    return t


def _load_record(counts_LE: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    share = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp_min(1)
    vio = [float(max_violation(c)) for c in counts_LE]
    return share.tolist(), vio


def evaluate(backend, model, batches: list[tuple[str, np.ndarray]], device: torch.device) -> dict[str, Any]:
    """Held-out loss, perplexity and MaxVio_global (load summed over the whole held-out split)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = _rank()
    stats = StepStats(model)
    domains = sorted({d for d, _ in batches})
    num_layers = len(stats.layers)
    num_experts = model.config.num_experts
    # Per domain: [loss_sum, tokens, counts_LE...]
    acc = torch.zeros(len(domains), 2 + num_layers * num_experts, dtype=torch.float64)
    for i, (domain, seqs) in enumerate(batches):
        if i % world != rank:
            continue
        x = torch.from_numpy(seqs.astype(np.int64)).to(device)
        stats.reset()
        loss = backend.forward(x)
        stats.collect()
        tokens = x.shape[0] * (x.shape[1] - 1)
        row = acc[domains.index(domain)]
        row[0] += float(loss) * tokens
        row[1] += tokens
        if stats.counts_LE is not None and stats.counts_LE.shape[1] == num_experts:
            row[2:] += stats.counts_LE.reshape(-1).double().cpu()
    _reduce_sum(acc)
    total_loss = float(acc[:, 0].sum() / acc[:, 1].sum().clamp_min(1))
    counts_LE = acc[:, 2:].sum(0).reshape(num_layers, num_experts)
    share, vio = _load_record(counts_LE) if num_layers else ([], [])
    out: dict[str, Any] = {"loss": total_loss, "ppl": math.exp(min(total_loss, 50.0)),
                           "max_vio_global": float(np.mean(vio)) if vio else 0.0, "max_vio_global_layers": vio,
                           "domain_loss": {}, "domain_load": {}}
    for j, d in enumerate(domains):
        if acc[j, 1] > 0:
            out["domain_loss"][d] = float(acc[j, 0] / acc[j, 1])
            c = acc[j, 2:].reshape(num_layers, num_experts)
            out["domain_load"][d] = (c / c.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
    return out


# ----------------------------------------------------------------------------- the job
def run_training(cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Train according to ``cfg`` on this process (every rank calls it).

    resume: "latest" or a checkpoint directory (see :func:`find_resume_checkpoint`).
    overwrite: without ``resume``, delete an earlier run's checkpoints and logs in
        ``train.output_dir`` instead of refusing to start.
    """
    world = world_size_from_env()
    check_world_size(cfg, world)  # before any process group exists
    t = cfg.train
    out_dir = os.path.abspath(t.output_dir)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    stale = not resume and bool(list_checkpoints(ckpt_root))
    if stale and not overwrite:  # every rank sees the same files, so all of them stop here
        raise ConfigError(f"train.output_dir={t.output_dir!r} already holds checkpoints of an earlier run; pass "
                          "--resume to continue it, --overwrite to start over, or choose another output_dir")
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    init_distributed(cfg, world, device)
    rank = _rank()
    if rank == 0:
        if stale:
            for name in ("checkpoints", "tb", "plots"):
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.unlink(os.path.join(out_dir, name))
        os.makedirs(ckpt_root, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.yaml"), dump_config(cfg))
        for name in os.listdir(ckpt_root):  # torn writes of a killed run
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)

    # Data: rank 0 builds the cache, everyone reads it.
    from megamoe.train.data import ShuffledBatches, cache_key, eval_batches, load_prepared, prepare_data
    cache_root = cfg.data.cache_dir or os.path.join(out_dir, "data")
    error: list[BaseException] = []
    if rank == 0:
        try:
            prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, cache_root=cache_root, log=_log)
        except BaseException as exc:  # the other ranks must still leave the collective below
            error.append(exc)
    failed = _reduce_sum(torch.tensor([1.0 if error else 0.0]))
    if error:
        raise error[0]
    if float(failed) > 0:
        raise RuntimeError("data preparation failed on rank 0 (see its error)")
    data = load_prepared(os.path.join(cache_root, cache_key(cfg.data, cfg.model.vocab_size)),
                         seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
    global_batch = t.micro_batch_size * t.grad_accum_steps * world
    sampler = ShuffledBatches(len(data.train_NS), global_batch, seed=cfg.data.seed)
    held_out = eval_batches(data.eval_NS, batch_size=t.micro_batch_size, world=world,
                            max_batches=t.eval_max_batches)
    if cfg.data.eval_fraction > 0 and not held_out:
        _log("warning: the held-out split is smaller than one batch per rank; evaluation is skipped")

    # Model: identical on every rank (same seed); EP sharding happens in the backend.
    from megamoe.model import MoETransformerLM, count_parameters
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    model = MoETransformerLM(cfg.model)
    for layer in model.moe_layers():
        layer.aux_loss_grad_scale = 1.0 / t.grad_accum_steps
    counts = count_parameters(model)
    from megamoe.train.backends import build_backend
    backend = build_backend(model, cfg, device=device)
    balancer = _build_balancer(cfg, backend)

    start_step = 0
    resume_from = find_resume_checkpoint(out_dir, resume) if resume else None
    if resume and resume_from is None:
        _log(f"--resume: no checkpoint under {ckpt_root}; starting from step 0")
    if resume_from:
        start_step = _load_checkpoint(resume_from, cfg, backend, balancer, world)
        _log(f"resumed from {resume_from} at step {start_step}")
    else:
        # Per-rank streams differ (router jitter) but are reproducible.
        torch.manual_seed(t.seed * 1000 + rank + 1)

    logger = MetricsLogger(out_dir, start_step=start_step, tensorboard=t.tensorboard) if rank == 0 else None
    _log(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
         f"{cfg.model.num_layers} layers, {cfg.model.num_experts} experts top-{cfg.model.router.top_k} "
         f"router {cfg.model.router.name!r}; backend {backend.name} (optimizer {backend.optimizer_name}), "
         f"world {world}, EP {cfg.parallel.ep_size}; data {len(data.train_NS)} x {cfg.data.seq_len} tokens, "
         f"global batch {global_batch}")

    from tqdm.auto import tqdm
    bar = tqdm(total=t.steps, initial=start_step, disable=rank != 0 or not t.progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    stats = StepStats(backend.model)
    tokens_per_step = global_batch * cfg.data.seq_len
    last_eval: dict[str, Any] | None = None
    last_ckpt: str | None = resume_from
    saved_step, evaluated_step = start_step if resume_from else -1, -1
    run_start = time.time()
    step = start_step
    try:
        for step in range(start_step + 1, t.steps + 1):
            t0 = time.time()
            _set_step(backend.model, step - 1)
            micro = [torch.from_numpy(sampler.micro_indices(step - 1, micro=m, rank=rank, world=world,
                                                            micro_batch=t.micro_batch_size)).long()
                     for m in range(t.grad_accum_steps)]
            batches = [torch.from_numpy(data.train_NS[idx.numpy()].astype(np.int64)).to(device) for idx in micro]
            stats.reset()
            loss, grad_norm = backend.train_step(batches, stats.collect)
            bal_metrics = balancer.update() if balancer is not None else None
            record = _train_record(step, loss, grad_norm, stats, backend, world, tokens_per_step,
                                   time.time() - t0, time.time() - run_start, bal_metrics)
            if logger is not None and (step % t.log_interval == 0 or step == t.steps):
                logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", maxvio=f"{record['max_vio']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if held_out and t.eval_interval and step % t.eval_interval == 0:
                last_eval = _run_eval(backend, model, held_out, device, step, logger)
                evaluated_step = step
            if t.save_interval and step % t.save_interval == 0:
                last_ckpt = save_checkpoint(cfg, backend, balancer, step, world, ckpt_root)
                saved_step = step
        if start_step >= t.steps:
            _log(f"the checkpoint is at step {start_step}, train.steps={t.steps}: nothing left to train")
            from megamoe.train.metrics import read_metrics
            evals = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["kind"] == "eval"]
            last_eval = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")} if evals else None
        elif held_out and evaluated_step != t.steps:
            last_eval = _run_eval(backend, model, held_out, device, step, logger)
        if saved_step != t.steps and start_step < t.steps:
            last_ckpt = save_checkpoint(cfg, backend, balancer, t.steps, world, ckpt_root)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    plots: list[str] = []
    if rank == 0 and t.plots:
        plots = write_plots(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "plots"))
    if rank == 0:
        summary = {"output_dir": out_dir, "final_step": t.steps, "checkpoint": last_ckpt,
                   "metrics": os.path.join(out_dir, "metrics.jsonl"), "tensorboard": os.path.join(out_dir, "tb"),
                   "plots": plots, "final_eval": last_eval, "tokenizer": data.tokenizer_path,
                   "parameters": counts, "wall_s": time.time() - run_start}
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    _barrier()
    return RunResult(out_dir, t.steps, last_ckpt, last_eval, plots)


def _set_step(model, step: int) -> None:
    if hasattr(model, "set_step"):
        model.set_step(step)


def _train_record(step, loss, grad_norm, stats: StepStats, backend, world, tokens_per_step, step_s, elapsed,
                  bal_metrics) -> dict[str, Any]:
    num_layers = len(stats.layers)
    e = stats.counts_LE.shape[1] if stats.counts_LE is not None else 0
    flat = torch.zeros(2 + num_layers * e, dtype=torch.float64)
    flat[0], flat[1] = loss, float(stats.aux) / max(1, stats.calls)
    if e:
        flat[2:] = stats.counts_LE.reshape(-1).double().cpu()
    _reduce_sum(flat)
    record: dict[str, Any] = {"kind": "train", "step": step, "loss": float(flat[0]) / world,
                              "aux_loss": float(flat[1]) / world, "lr": backend.lr, "grad_norm": grad_norm}
    if e:
        share, vio = _load_record(flat[2:].reshape(num_layers, e))
        record.update(max_vio=float(np.mean(vio)), max_vio_layers=vio, load=share)
    else:
        record.update(max_vio=0.0, max_vio_layers=[], load=[])
    if isinstance(bal_metrics, dict):
        record.update({f"balancer_{k}": float(v) for k, v in bal_metrics.items()
                       if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)})
    record.update(tokens=step * tokens_per_step, tokens_per_s=tokens_per_step / max(step_s, 1e-9), time=elapsed)
    return record


def _run_eval(backend, model, held_out, device, step, logger) -> dict[str, Any]:
    result = evaluate(backend, model, held_out, device)
    if logger is not None:
        logger.log({"kind": "eval", "step": step, **result})
    _log(f"step {step}: held-out loss {result['loss']:.4f}, ppl {result['ppl']:.2f}, "
         f"MaxVio_global {result['max_vio_global']:.3f}")
    return result


def _build_balancer(cfg: TrainConfig, backend):
    if cfg.balancing is None:
        return None
    from megamoe.config import from_dict
    from megamoe.routing import balancing  # type: ignore[attr-defined]
    bcfg = from_dict(balancing.AuxFreeBalancingConfig, cfg.balancing, where="balancing")
    return balancing.AuxFreeBalancer(backend.model, bcfg)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(cfg: TrainConfig, backend, balancer, step: int, world: int, ckpt_root: str) -> str:
    """Write ``step_<step>`` atomically (all ranks call this); prune to ``keep_last``."""
    rank = _rank()
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    backend.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        if balancer is not None and hasattr(balancer, "state_dict"):
            torch.save(balancer.state_dict(), os.path.join(tmp, "balancer.pt"))
        meta = {"model": to_dict(cfg.model), "train_config": to_dict(cfg), "step": step,
                "backend": backend.name, "world_size": world, "ep_size": cfg.parallel.ep_size,
                "format": "megamoe-train-v1"}
        with open(os.path.join(tmp, "megamoe_config.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    _barrier()
    if rank == 0:
        if os.path.isdir(final):  # re-saving a step (e.g. resumed at the last step): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(os.path.join(ckpt_root, "latest"), name + "\n")
        for _, old in list_checkpoints(ckpt_root)[:-cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _load_checkpoint(path: str, cfg: TrainConfig, backend, balancer, world: int) -> int:
    with open(os.path.join(path, "megamoe_config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta["model"] != to_dict(cfg.model):
        diff = sorted(k for k in set(meta["model"]) | set(to_dict(cfg.model))
                      if meta["model"].get(k) != to_dict(cfg.model).get(k))
        raise ConfigError(f"checkpoint {path!r} was trained with a different model config (fields differ: "
                          f"{', '.join(diff)}); resume with the original model section")
    if meta.get("backend") != backend.name:
        raise ConfigError(f"checkpoint {path!r} was written by the {meta.get('backend')!r} backend; resume it "
                          f"with parallel.backend={meta.get('backend')}")
    backend.load(path)
    rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_file) and meta.get("world_size") == world:
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:  # a different world size: RNG streams cannot match an uninterrupted run anyway
        torch.manual_seed(cfg.train.seed * 1000 + _rank() + 1 + int(meta["step"]))
    bal_file = os.path.join(path, "balancer.pt")
    if balancer is not None and os.path.isfile(bal_file) and hasattr(balancer, "load_state_dict"):
        balancer.load_state_dict(torch.load(bal_file, weights_only=False))
    return int(meta["step"])


def load_trained_model(ckpt_dir: str):
    """Rebuild the trained MoETransformerLM (full model, one process) from a checkpoint of
    either backend: ``model.safetensors`` (torch) or the DeepSpeed engine files (via
    ``megamoe.integrations.deepspeed.load_full_state_dict``, which merges expert shards)."""
    from megamoe.config import from_dict
    from megamoe.model import ModelConfig, MoETransformerLM

    meta_path = os.path.join(ckpt_dir, "megamoe_config.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{ckpt_dir!r} is not a megamoe checkpoint (no megamoe_config.json)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model = MoETransformerLM(from_dict(ModelConfig, meta["model"], where="model"))
    path = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_model
        load_model(model, path)
    else:
        from megamoe.integrations.deepspeed import load_full_state_dict  # type: ignore[import-not-found]
        model.load_state_dict(load_full_state_dict(ckpt_dir, tag="engine"))
    return model.eval()
