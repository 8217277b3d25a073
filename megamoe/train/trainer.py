"""The training job: process group, data, model, backend, loop, eval, checkpoints, plots.

Shape legend: L MoE layers, E experts, B micro batch, S sequence length.

:func:`run_training` is what ``megamoe train`` calls on every rank. Order of events: the
config is validated against the world size before any process group starts; rank 0
prepares (or reuses) the cached data while the others wait; every rank builds the same model
from the same seed; the backend (torch or deepspeed) wraps it; ``--resume`` restores the
newest complete checkpoint; the loop then runs optimizer steps, logging per step the
all-reduced loss and per-layer expert load (MaxVio), evaluating on the held-out split and
checkpointing every N steps. A step whose loss or gradient norm is NaN or inf is never applied:
``train.nonfinite: error`` stops the run there (NonFiniteError naming the step and, where it
can tell, the module or gradient where the first NaN/inf appeared; the checkpoints written so
far are kept and ``summary.json`` records ``status: nonfinite``), ``skip`` drops the step and
counts it (``skipped`` in its metrics record, ``nonfinite_steps_skipped`` in the summary).

Checkpoints live in ``<output_dir>/checkpoints/step_<N>`` and are written through the staged
protocol of :mod:`megamoe.checkpoint.staged`: every rank writes its share into a hidden
staged copy, the ranks seal it with a sha256 manifest, and rank 0 swaps it in (an existing
``step_<N>`` is replaced only by that swap), so at every instant a complete copy is reachable
and the next start finishes or undoes whatever a kill interrupted. Weights holding NaN or
inf are never written. Rotation keeps the ``keep_last`` newest, always including the one
just written. Each holds ``megamoe_config.json`` = {"model": ModelConfig dict,
"train_config": the whole TrainConfig, "step", "backend", "world_size", "format",
"tokenizer", "manifest", "step_state" (the per-step state: ALF-LB update count, dead-expert
window; megamoe.train.step_state)}, the backend's files, one ``rng_rank<r>.pt`` per rank, so a resumed
run repeats an uninterrupted run step for step, ``tokenizer.model``, the sentencepiece model
the run tokenised with (so ``megamoe convert`` exports it; see megamoe.checkpoint.tokenizers),
and ``megamoe_manifest.json``. ``--resume`` verifies before it loads and falls back to the
newest checkpoint that verifies, saying which it skipped and why.

``train.init_from`` (megamoe.train.init_from) starts a run from other weights at step 0;
``--resume`` only accepts the checkpoints of a run (weights-only directories are refused
with a pointer to init_from).
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
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megamoe.atomic import atomic_torch_save
from megamoe.checkpoint.consolidated import CONFIG_NAME
from megamoe.checkpoint.integrity import (MANIFEST_KEY, MANIFEST_NAME, CheckpointError, NonFiniteWeightsError,
                                          Verification, check_loaded_finite, load_safetensors_model,
                                          nonfinite_message, nonfinite_tensors, read_json, torch_load,
                                          unverified_warning, verify_directory)
from megamoe.checkpoint.staged import (StagedDirectory, check_output_path, crash_point, is_sealed,
                                       promote_legacy_staging, recover_root, remove_tree, run_agreed)
from megamoe.config import ConfigError, to_dict
from megamoe.finite import NonFiniteError
from megamoe.stats import LoadCounter, LoadReport, all_reduce_sum, moe_layers
from megamoe.train.config import (LR_SCHEDULE_FIELDS, TrainConfig, check_world_size, dump_config, resume_changes,
                                  world_size_from_env)
from megamoe.train.metrics import MetricsLogger, atomic_write_text, write_plots
from megamoe.train.step_state import MoEStepState

CKPT_RE = re.compile(r"^step_(\d+)$")


@dataclass
class RunResult:
    output_dir: str
    final_step: int
    checkpoint: str | None
    final_eval: dict[str, Any] | None
    plots: list[str]
    nonfinite_steps_skipped: int = 0


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
    """(step, path) of every ``step_<N>`` directory, oldest first (complete or not: only a
    published checkpoint carries that name; :func:`find_resume_checkpoint` verifies it)."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = CKPT_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


RUN_CHECKPOINT_FORMAT = "megamoe-train-v1"


def _resume_advice(ckpt_root: str) -> str:
    return (f"resume from another checkpoint (--resume {ckpt_root}{os.sep}step_N; a plain --resume takes the newest "
            "one that verifies), or restore the file from a copy")


def verify_checkpoint(path: str, *, collective: bool = False) -> Verification:
    """Check a training checkpoint against its manifest (every rank calls it when
    ``collective``); :class:`CheckpointError` names the first bad file."""
    return verify_directory(path, marker=CONFIG_NAME, collective=collective,
                            advice=_resume_advice(os.path.dirname(os.path.abspath(path))))


def find_resume_checkpoint(output_dir: str, resume: str, *, collective: bool = False) -> str | None:
    """The checkpoint ``--resume`` continues from, verified.

    ``resume`` = a checkpoint path (used as given: a damaged one raises :class:`CheckpointError`;
    a weights-only directory, such as a ``megamoe convert`` output, is refused with a pointer to
    ``train.init_from``) or "latest": the newest checkpoint under output_dir that verifies; each
    newer one that does not is skipped with a message saying why. None when there is no
    checkpoint; an error when none verifies. ``collective``: every rank calls it (the hashing is
    shared).
    """
    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, CONFIG_NAME)):
            if os.path.isdir(resume) and os.path.isfile(os.path.join(resume, MANIFEST_NAME)):
                verify_checkpoint(resume, collective=collective)  # names the missing file
            hint = (f"; to start training from these weights use train.init_from={resume}"
                    if os.path.isfile(os.path.join(resume, "config.json")) else "")
            raise ConfigError(f"--resume {resume!r}: not a megamoe checkpoint directory (no {CONFIG_NAME})" + hint)
        if not verify_checkpoint(resume, collective=collective).verified:
            _log(f"warning: {unverified_warning(resume)}")
        meta = read_json(os.path.join(resume, CONFIG_NAME), advice=_resume_advice(os.path.dirname(resume)))
        if not isinstance(meta, dict) or meta.get("format") != RUN_CHECKPOINT_FORMAT:
            raise ConfigError(f"--resume {resume!r}: this directory holds model weights only (no optimizer state, "
                              "step or RNG state of a training run, e.g. a megamoe convert output); --resume continues "
                              f"a run from its own checkpoints. To train from these weights start a run with "
                              f"train.init_from={resume}")
        return resume
    ckpt_root = os.path.join(output_dir, "checkpoints")
    skipped: list[str] = []
    for _, path in reversed(list_checkpoints(ckpt_root)):
        try:
            result = verify_checkpoint(path, collective=collective)
        except CheckpointError as exc:
            _log(f"--resume: skipping {os.path.basename(path)}: {exc.path} {exc.problem}")
            skipped.append(f"{exc.path} {exc.problem}")
            continue
        if not result.verified:
            _log(f"warning: {unverified_warning(path)}")
        if skipped:
            _log(f"--resume: using {os.path.basename(path)}, the newest checkpoint that verifies "
                 f"({len(skipped)} newer one(s) skipped; they are left in place and replaced as training reaches them)")
        return path
    if skipped:
        raise CheckpointError(ckpt_root, f"none of its {len(skipped)} checkpoint(s) verifies ({'; '.join(skipped)})",
                              "nothing was loaded: restore a checkpoint from a copy, or start over with --overwrite")
    return None


def _holds_checkpoints(ckpt_root: str) -> bool:
    """Published checkpoints, or a sealed staged / moved-aside one the next start recovers."""
    if list_checkpoints(ckpt_root):
        return True
    return os.path.isdir(ckpt_root) and any(
        (n.startswith(".step_") and n.endswith(".old")) or
        (n.startswith(".step_") and n.endswith(".staging") and is_sealed(os.path.join(ckpt_root, n, n[1:-8])))
        for n in os.listdir(ckpt_root))


def check_output_paths(cfg: TrainConfig) -> None:
    """Refuse output locations that cannot be created, and data inputs that a run would
    delete: ``--overwrite`` and checkpoint rotation remove ``checkpoints/``, ``tb/``, ``plots/``
    and the logs of ``train.output_dir``, so no data file, tokenizer or cache may live there."""
    out_dir = os.path.abspath(cfg.train.output_dir)
    check_output_path(out_dir, what="train.output_dir", error=ConfigError)
    if cfg.data.cache_dir:
        check_output_path(cfg.data.cache_dir, what="data.cache_dir", error=ConfigError)
    inputs = [("data.files", f) for f in cfg.data.files] + ([("data.tokenizer", cfg.data.tokenizer)]
                                                            if cfg.data.tokenizer else [])
    inputs += [("data.cache_dir", cfg.data.cache_dir)] if cfg.data.cache_dir else []
    for sub in ("checkpoints", "tb", "plots", "metrics.jsonl", "summary.json", "config.yaml"):
        target = Path(os.path.realpath(os.path.join(out_dir, sub)))
        for field, path in inputs:
            real_in = Path(os.path.realpath(path))
            if real_in == target or target in real_in.parents:
                raise ConfigError(f"{field}={path!r} lies in {target}, which this run writes and may delete "
                                  "(checkpoint rotation, --overwrite); move it out of train.output_dir or choose "
                                  "another output_dir")


def _legacy_checkpoint_complete(tmp: str) -> bool:
    """A checkpoint staged by megamoe before the manifest protocol (``.tmp-step_N``) is complete
    when it holds its config and every rank's RNG file."""
    if not CKPT_RE.match(os.path.basename(tmp)[len(".tmp-"):]):
        return False
    try:
        meta = read_json(os.path.join(tmp, CONFIG_NAME))
        return all(os.path.isfile(os.path.join(tmp, f"rng_rank{r}.pt")) for r in range(int(meta["world_size"])))
    except (CheckpointError, KeyError, TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- evaluation
def evaluate(backend, model, batches: list[tuple[str, np.ndarray]], device: torch.device) -> dict[str, Any]:
    """Held-out loss, perplexity and MaxVio_global (load summed over the whole held-out split),
    with the loss and load per domain; one all-reduce."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = _rank()
    layers = moe_layers(model)
    domains = sorted({d for d, _ in batches})
    num_layers = len(layers)
    num_experts = model.config.moe.num_experts
    # Per domain: [loss_sum, tokens, counts_LE...]
    acc = torch.zeros(len(domains), 2 + num_layers * num_experts, dtype=torch.float64)
    with LoadCounter([layer.router for layer in layers], training_only=False) as counter:
        for i, (domain, seqs) in enumerate(batches):
            if i % world != rank:
                continue
            x = torch.from_numpy(seqs.astype(np.int64)).to(device)
            loss = backend.forward(x)
            selected_F = counter.take()[0]
            tokens = x.shape[0] * (x.shape[1] - 1)
            row = acc[domains.index(domain)]
            row[0] += float(loss) * tokens
            row[1] += tokens
            row[2:] += selected_F.cpu()
    all_reduce_sum(acc)
    total_loss = float(acc[:, 0].sum() / acc[:, 1].sum().clamp_min(1))
    vio = LoadReport.of(acc[:, 2:].sum(0).reshape(num_layers, num_experts)).max_vio if num_layers else []
    out: dict[str, Any] = {"loss": total_loss, "ppl": math.exp(min(total_loss, 50.0)),
                           "max_vio_global": float(np.mean(vio)) if vio else 0.0, "max_vio_global_layers": vio,
                           "domain_loss": {}, "domain_load": {}}
    for j, d in enumerate(domains):
        if acc[j, 1] > 0:
            out["domain_loss"][d] = float(acc[j, 0] / acc[j, 1])
            out["domain_load"][d] = LoadReport.of(acc[j, 2:].reshape(num_layers, num_experts)).shares
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
    check_output_paths(cfg)
    stale = not resume and _holds_checkpoints(ckpt_root)
    if stale and not overwrite:  # every rank sees the same files, so all of them stop here
        raise ConfigError(f"train.output_dir={t.output_dir!r} already holds checkpoints of an earlier run; pass "
                          "--resume to continue it, --overwrite to start over, or choose another output_dir")
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    init_distributed(cfg, world, device)
    rank = _rank()
    def start_outputs() -> None:
        if rank != 0:
            return
        # What a killed run left: finish or undo its interrupted writes before anything reads them.
        recover_root(out_dir, busy="skip", log=_log)
        recover_root(ckpt_root, busy="raise", log=_log)
        # Such a run deleted step_N before renaming its staged copy in, so a kill between the two
        # left the only copy there.
        promote_legacy_staging(ckpt_root, prefix=".tmp-step_", complete=_legacy_checkpoint_complete, log=_log)
        if stale:
            remove_tree(ckpt_root)
            for name in ("tb", "plots"):
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.unlink(os.path.join(out_dir, name))
        os.makedirs(ckpt_root, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.yaml"), dump_config(cfg))

    run_agreed(start_outputs, collective=True)
    # Before any slow set-up: a damaged or weights-only --resume target, a different model or
    # backend, or a setting that may not change on resume fails here.
    resume_from = find_resume_checkpoint(out_dir, resume, collective=True) if resume else None
    resume_meta, resume_changed = _check_resume_config(resume_from, cfg) if resume_from else ({}, {})

    # Data: rank 0 builds the cache, everyone reads it.
    from megamoe.train.data import ShuffledBatches, cache_key, eval_batches, load_prepared, prepare_data
    cache_root = cfg.data.cache_dir or os.path.join(out_dir, "data")
    error: list[BaseException] = []
    if rank == 0:
        try:
            prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, cache_root=cache_root, log=_log)
        except BaseException as exc:  # the other ranks must still leave the collective below
            error.append(exc)
    failed = all_reduce_sum(torch.tensor([1.0 if error else 0.0]))
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
    if t.init_from and not resume_from:
        _init_weights(model, cfg, data.tokenizer_path)  # before the backend shards the experts
    counts = count_parameters(model)
    # Before the backend: the balancer's bias buffers exist before any weights load, and the
    # DeepSpeed backend keeps its aux-loss scale in line with the fp16 loss scale.
    step_state = MoEStepState(model, balancing=cfg.balancing, accumulation_steps=t.grad_accum_steps,
                              dead_expert_window=t.dead_expert_window)
    from megamoe.train.backends import build_backend
    backend = build_backend(model, cfg, device=device, step_state=step_state)

    start_step = 0
    if resume and resume_from is None:
        _log(f"--resume: no checkpoint under {ckpt_root}; starting from step 0")
    if resume_from:
        start_step = _load_checkpoint(resume_from, resume_meta, resume_changed, cfg, backend, step_state, world)
        _log(f"resumed from {resume_from} at step {start_step}")
    else:
        # Per-rank streams differ (router jitter) but are reproducible.
        torch.manual_seed(t.seed * 1000 + rank + 1)

    logger = MetricsLogger(out_dir, start_step=start_step, tensorboard=t.tensorboard) if rank == 0 else None
    _log(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
         f"{cfg.model.num_layers} layers, {cfg.model.moe.num_experts} experts top-{cfg.model.moe.router.top_k} "
         f"router {cfg.model.moe.router.name!r}; backend {backend.name} (optimizer {backend.optimizer_name}), "
         f"world {world}, EP {cfg.parallel.ep_size}; data {len(data.train_NS)} x {cfg.data.seq_len} tokens, "
         f"global batch {global_batch}")

    from tqdm.auto import tqdm
    bar = tqdm(total=t.steps, initial=start_step, disable=rank != 0 or not t.progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = global_batch * cfg.data.seq_len
    last_eval: dict[str, Any] | None = None
    last_ckpt: str | None = resume_from
    saved_step, evaluated_step = start_step if resume_from else -1, -1
    run_start = time.time()
    step = start_step
    skipped = {"nonfinite": 0, "overflow": 0}  # steps not applied: NaN/inf, DeepSpeed fp16 loss-scale overflow

    def write_summary(final_step: int, **status: Any) -> list[str]:
        if rank != 0:
            return []
        plots = write_plots(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "plots")) if t.plots else []
        summary = {"output_dir": out_dir, "final_step": final_step, "checkpoint": last_ckpt,
                   "metrics": os.path.join(out_dir, "metrics.jsonl"), "tensorboard": os.path.join(out_dir, "tb"),
                   "plots": plots, "final_eval": last_eval, "tokenizer": data.tokenizer_path,
                   "parameters": counts, "wall_s": time.time() - run_start,
                   "nonfinite_steps_skipped": skipped["nonfinite"], "overflow_steps_skipped": skipped["overflow"],
                   **status}
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
        return plots

    failure: NonFiniteError | None = None
    try:
        for step in range(start_step + 1, t.steps + 1):
            t0 = time.time()
            step_state.begin_step(step - 1)
            micro = [torch.from_numpy(sampler.micro_indices(step - 1, micro=m, rank=rank, world=world,
                                                            micro_batch=t.micro_batch_size)).long()
                     for m in range(t.grad_accum_steps)]
            batches = [torch.from_numpy(data.train_NS[idx.numpy()].astype(np.int64)).to(device) for idx in micro]
            result = backend.train_step(batches)
            # One all-reduce: the loss, the load of every layer and the ALF-LB counts; a step
            # that was not applied moves no bias.
            report = step_state.end_step(apply=not result.nonfinite, extra=[result.loss])
            record = _train_record(step, result, report, backend, world, tokens_per_step, time.time() - t0,
                                   time.time() - run_start)
            if result.overflow or (result.nonfinite and t.nonfinite == "skip"):
                kind = "nonfinite" if result.nonfinite else "overflow"
                skipped[kind] += 1
                record.update(skipped=kind, **{f"{k}_steps_skipped": v for k, v in skipped.items()})
            record["nonfinite"] = result.nonfinite
            if logger is not None and (step % t.log_interval == 0 or step == t.steps or result.nonfinite):
                logger.log(record)
            if result.nonfinite:
                what = (f"step {step} is non-finite (loss {result.loss}, gradient norm {result.grad_norm}"
                        + (f"; first NaN/inf in {result.where})" if result.where else ")"))
                if t.nonfinite == "error":
                    raise NonFiniteError(
                        f"{what}. The run stops here without applying it; the last good checkpoint is "
                        f"{last_ckpt or 'none (no checkpoint was written)'}. Resume from it with a lower train.lr or "
                        "train.grad_clip (--resume train.lr=...), or set train.nonfinite=skip to drop such steps")
                _log(f"warning: {what}: skipped (train.nonfinite=skip; {skipped['nonfinite']} so far)")
            bar.set_postfix(loss=f"{record['loss']:.3f}", maxvio=f"{record['max_vio']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if held_out and t.eval_interval and step % t.eval_interval == 0:
                last_eval = _run_eval(backend, model, held_out, device, step, logger)
                evaluated_step = step
            if t.save_interval and step % t.save_interval == 0:
                last_ckpt = save_checkpoint(cfg, backend, step_state, step, world, ckpt_root,
                                            tokenizer=data.tokenizer_path)
                saved_step = step
        if start_step >= t.steps:
            _log(f"the checkpoint is at step {start_step}, train.steps={t.steps}: nothing left to train")
            from megamoe.train.metrics import read_metrics
            evals = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["kind"] == "eval"]
            last_eval = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")} if evals else None
        elif held_out and evaluated_step != t.steps:
            last_eval = _run_eval(backend, model, held_out, device, step, logger)
        if saved_step != t.steps and start_step < t.steps:
            last_ckpt = save_checkpoint(cfg, backend, step_state, t.steps, world, ckpt_root,
                                        tokenizer=data.tokenizer_path)
    except NonFiniteError as exc:  # every rank raises it at the same step (the check is all-reduced)
        failure = exc
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if failure is not None:
        write_summary(step - 1, status="nonfinite", failed_step=step, error=str(failure))
        raise failure
    if skipped["nonfinite"]:
        _log(f"{skipped['nonfinite']} non-finite step(s) were skipped (see 'skipped' in metrics.jsonl)")
    plots = write_summary(t.steps, status="completed")
    _barrier()
    return RunResult(out_dir, t.steps, last_ckpt, last_eval, plots, skipped["nonfinite"])


def _train_record(step, result, report, backend, world, tokens_per_step, step_s, elapsed) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": "train", "step": step, "loss": report.extra[0] / world,
                              "aux_loss": report.aux_loss / world, "lr": backend.lr, "grad_norm": result.grad_norm}
    load = report.load
    if load is not None:
        summary = load.summary()
        record.update(max_vio=summary["max_vio"], max_vio_layers=load.max_vio, load=load.shares,
                      dropped_fraction=summary["dropped_fraction"], dropped_fraction_layers=load.dropped_fraction,
                      routing_entropy=summary["routing_entropy"], routing_entropy_layers=load.routing_entropy,
                      load_percentiles_layers=load.percentiles, dead_experts=int(summary["dead_experts"]),
                      dead_experts_layers=load.dead_experts)
    else:
        record.update(max_vio=0.0, max_vio_layers=[], load=[])
    record.update({f"balancer_{k}": float(v) for k, v in report.metrics.items() if k.startswith("alflb/")})
    record.update(tokens=step * tokens_per_step, tokens_per_s=tokens_per_step / max(step_s, 1e-9), time=elapsed)
    return record


def _run_eval(backend, model, held_out, device, step, logger) -> dict[str, Any]:
    result = evaluate(backend, model, held_out, device)
    if logger is not None:
        logger.log({"kind": "eval", "step": step, **result})
    _log(f"step {step}: held-out loss {result['loss']:.4f}, ppl {result['ppl']:.2f}, "
         f"MaxVio_global {result['max_vio_global']:.3f}")
    return result


# ----------------------------------------------------------------------------- checkpoints
def _init_weights(model, cfg: TrainConfig, tokenizer_path: str) -> None:
    """Load ``train.init_from``'s weights into the freshly built ``model`` (every rank)."""
    from megamoe.checkpoint.consolidated import load_state_dict_with_buffers
    from megamoe.checkpoint.tokenizers import TOKENIZER_NAME, file_sha256
    from megamoe.train.init_from import load_init_model, model_differences

    path = cfg.train.init_from
    init = load_init_model(path)
    diffs = model_differences(init.config, cfg.model)
    if diffs:  # load_config fills the model section from init_from; a hand-built TrainConfig may not
        raise ConfigError(f"train.init_from={path!r}: its model differs from model.* in "
                          + ", ".join(f"{k} ({a!r} vs {b!r})" for k, a, b in diffs)
                          + "; build the config with megamoe.train.config.load_config, which takes the model from it")
    load_state_dict_with_buffers(model, init.state_dict())
    own = os.path.join(path, TOKENIZER_NAME)
    if not os.path.isfile(own):
        _log(f"warning: train.init_from={path!r} carries no tokenizer: training with a new one, so the token ids "
             "differ from those its embeddings were trained on")
    elif file_sha256(own) != file_sha256(tokenizer_path):
        raise ConfigError(f"train.init_from={path!r}: the data pipeline tokenises with {tokenizer_path}, not its "
                          f"{own}; leave data.tokenizer unset (init_from supplies it)")
    _log(f"initialised the weights from {path} (fresh optimizer, step 0)")



def _local_weights(model) -> list[tuple[str, torch.Tensor]]:
    """This rank's parameters and buffers (its ZeRO-3 partition where parameters are partitioned)."""
    named = [(n, getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p)
             for n, p in model.named_parameters()]
    return named + [(n, b) for n, b in model.named_buffers() if b is not None]


def _nonfinite_everywhere(model) -> list[tuple[str, int]]:
    """Non-finite tensors of every rank (a collective under torch.distributed)."""
    bad = nonfinite_tensors(_local_weights(model))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, bad)
        merged: dict[str, int] = {}
        for part in gathered:
            merged.update(dict(part))
        bad = sorted(merged.items())
    return bad


def save_checkpoint(cfg: TrainConfig, backend, step_state, step: int, world: int, ckpt_root: str, *,
                    tokenizer: str | None = None) -> str:
    """Write ``step_<step>`` through the staged protocol (all ranks call this); prune to ``keep_last``.
    ``tokenizer``: the sentencepiece model the run tokenises with, stored in the checkpoint.

    Refused (:class:`NonFiniteWeightsError`, nothing written) when any weight is NaN or inf.
    Every rank writes its files into the staged copy, the ranks hash them into the manifest,
    rank 0 swaps the sealed copy in (replacing an earlier ``step_<step>`` only then), points
    ``latest`` at it and removes the oldest checkpoints beyond ``keep_last``: never the one
    just written, which is the newest good one.
    """
    rank = _rank()
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    bad = _nonfinite_everywhere(backend.model)
    if bad:
        raise NonFiniteWeightsError(nonfinite_message(bad, what=f"checkpoint {final} (step {step})"))
    with StagedDirectory(final, collective=True, log=_log) as staged:
        tmp = str(staged.payload)
        # A failure raises on its rank and leaves the block without a collective; inside DeepSpeed's own
        # collective save the other ranks learn of it as a closed connection when that process exits.
        backend.save(tmp)
        crash_point("save.partial")

        def write_rest() -> None:
            atomic_torch_save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
            if rank == 0:
                meta = {"model": to_dict(cfg.model), "train_config": to_dict(cfg), "step": step,
                        "backend": backend.name, "world_size": world, "ep_size": cfg.parallel.ep_size,
                        "format": RUN_CHECKPOINT_FORMAT, "step_state": step_state.state_dict(),
                        MANIFEST_KEY: MANIFEST_NAME}
                if tokenizer:
                    from megamoe.checkpoint.tokenizers import store_tokenizer
                    meta["tokenizer"] = store_tokenizer(tokenizer, tmp)
                atomic_write_text(os.path.join(tmp, CONFIG_NAME), json.dumps(meta, indent=1))

        run_agreed(write_rest, collective=True)
    if rank == 0:
        atomic_write_text(os.path.join(ckpt_root, "latest"), name + "\n")
        crash_point("save.latest")
        # Newest first, the one just written always kept (a checkpoint from an abandoned, later
        # part of the run, e.g. one skipped as damaged, counts as newer and is replaced in turn).
        others = [p for _, p in reversed(list_checkpoints(ckpt_root)) if os.path.abspath(p) != os.path.abspath(final)]
        for old in others[max(cfg.train.keep_last - 1, 0):]:
            remove_tree(old)
            crash_point("save.rotated_one")
    _barrier()
    return final


def _check_resume_config(path: str, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """The checkpoint's ``megamoe_config.json`` and the settings ``cfg`` changes against it;
    ConfigError for a different model or backend or a setting that may not change on resume
    (every rank reads the same file, so all of them stop here, before data preparation)."""
    advice = _resume_advice(os.path.dirname(os.path.abspath(path)))
    meta_path = os.path.join(path, CONFIG_NAME)
    meta = read_json(meta_path, advice=advice)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(meta_path, "lacks the 'model' config or the 'step' of a training checkpoint", advice)
    from megamoe.config import from_dict
    from megamoe.model import ModelConfig
    from megamoe.train.init_from import model_differences
    diff = model_differences(from_dict(ModelConfig, meta["model"], where="model"), cfg.model, ignore=())
    if diff:  # compared in effect: num_kv_heads=None and an explicit equal head count build the same model
        raise ConfigError(f"checkpoint {path!r} was trained with a different model config (fields differ: "
                          f"{', '.join(k for k, _, _ in diff)}); resume with the original model section")
    if meta.get("backend") != cfg.parallel.backend:
        raise ConfigError(f"checkpoint {path!r} was written by the {meta.get('backend')!r} backend; resume it "
                          f"with parallel.backend={meta.get('backend')}")
    return meta, resume_changes(meta.get("train_config"), cfg, checkpoint=path)


def _load_checkpoint(path: str, meta: dict[str, Any], changes: dict[str, tuple[Any, Any]], cfg: TrainConfig,
                     backend, step_state, world: int) -> int:
    """Load a verified checkpoint (``meta`` and ``changes`` from :func:`_check_resume_config`)
    into ``backend`` (every rank); returns its step."""
    advice = _resume_advice(os.path.dirname(os.path.abspath(path)))
    backend.load(path)
    if any(k in changes for k in LR_SCHEDULE_FIELDS):
        backend.set_lr_schedule(cfg.train.lr)
    told = {k: v for k, v in changes.items() if k not in ("train.output_dir", "data.cache_dir")}  # where, not how
    if told:
        _log("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in told.items()))
    old_t = (meta.get("train_config") or {}).get("train", {})
    old_batch = old_t.get("micro_batch_size", 0) * old_t.get("grad_accum_steps", 0) * meta.get("world_size", 0)
    new_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    if old_batch and old_batch != new_batch:
        _log(f"warning: the global batch changes from {old_batch} to {new_batch} sequences on resume, so the data "
             "order differs from an uninterrupted run")
    bad = _nonfinite_everywhere(backend.model)
    if bad:  # a damaged file of a checkpoint written before manifests
        listed = ", ".join(f"{n} ({k} values)" for n, k in bad[:6])
        raise CheckpointError(path, f"loads NaN or inf into {len(bad)} weight tensor(s): {listed}", advice)
    rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_file) and meta.get("world_size") == world:
        set_rng_state(torch_load(rng_file, weights_only=False, advice=advice))
    else:  # a different world size: RNG streams cannot match an uninterrupted run anyway
        torch.manual_seed(cfg.train.seed * 1000 + _rank() + 1 + int(meta["step"]))
    # The per-step state (ALF-LB update count, dead-expert window); checkpoints written before it
    # was kept in megamoe_config.json hold only the ALF-LB state, in balancer.pt.
    legacy = os.path.join(path, "balancer.pt")
    if isinstance(meta.get("step_state"), dict):
        step_state.load_state_dict(meta["step_state"])
    elif os.path.isfile(legacy):
        step_state.load_state_dict(torch_load(legacy, weights_only=False, advice=advice))
    step_state.begin_step(int(meta["step"]))
    return int(meta["step"])


def load_trained_model(ckpt_dir: str):
    """Rebuild the trained MoETransformerLM (full model, one process) from a checkpoint of
    either backend: ``model.safetensors`` (torch) or the DeepSpeed engine files (via
    ``megamoe.checkpoint.reshardable.load_full_state_dict``, which merges expert shards).

    The checkpoint is verified first: a missing or changed file raises :class:`CheckpointError`
    naming it (one written before manifests loads with a warning)."""
    from megamoe.config import from_dict
    from megamoe.model import ModelConfig, MoETransformerLM

    meta_path = os.path.join(ckpt_dir, CONFIG_NAME)
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"{ckpt_dir!r} is not a directory")
    verified = verify_checkpoint(ckpt_dir).verified  # first: it names a missing megamoe_config.json too
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{ckpt_dir!r} is not a megamoe checkpoint (no {CONFIG_NAME})")
    if not verified:
        warnings.warn(unverified_warning(ckpt_dir), stacklevel=2)
    advice = _resume_advice(os.path.dirname(os.path.abspath(ckpt_dir)))
    meta = read_json(meta_path, advice=advice)
    try:
        model = MoETransformerLM(from_dict(ModelConfig, meta["model"], where="model"))
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(meta_path, f"holds no valid model config ({type(exc).__name__}: {exc})", advice) from exc
    path = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.isfile(path):
        load_safetensors_model(model, path, advice=advice)
    else:
        from megamoe.checkpoint.reshardable import load_full_state_dict
        state = load_full_state_dict(ckpt_dir, tag="engine", verify=False)  # verified above with the rest
        check_loaded_finite(state.items(), os.path.join(ckpt_dir, "engine"), advice=advice)
        model.load_state_dict(state)
    check_loaded_finite(model.state_dict().items(), ckpt_dir, advice=advice)
    return model.eval()
