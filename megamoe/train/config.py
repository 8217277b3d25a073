"""TrainConfig: everything ``megamoe train`` reads, one YAML file mapped 1:1 onto dataclasses.

Sections: ``model`` (megamoe.model.ModelConfig), ``data`` (DataConfig), ``train``
(LoopConfig), ``parallel`` (ParallelConfig), ``deepspeed`` (a DeepSpeed config mapping, or
the path of a JSON/YAML file holding one) and ``balancing`` (the auxiliary-loss-free balancer,
megamoe.routing.balancing.AuxFreeBalancingConfig: ``{}`` for its defaults, or null for none).
:func:`load_config` reads the YAML, applies ``key=value`` overrides with dotted keys
(``train.steps=50``, ``model.moe.router.top_k=1``; values parsed as YAML), and rejects unknown
keys with a did-you-mean. :func:`check_world_size` refuses a config that
cannot run on the given number of processes; the CLI calls it before any process group
starts.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

from megamoe.config import ConfigError, check_fields, from_dict, spec, to_dict
from megamoe.config import yaml_load as _yaml_load
from megamoe.model import ModelConfig
from megamoe.parallel import DIST_BACKENDS, launcher_world_size
from megamoe.routing.balancing import AuxFreeBalancingConfig

DATA_SOURCES = ("embedded", "files", "hub")
FILE_FORMATS = ("auto", "text", "json", "parquet")
BACKENDS = ("deepspeed", "torch")
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: deepspeed backend, ZeRO 1-3 (dynamic loss scaling)
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("error", "skip")




@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from.

    source: ``embedded`` (a corpus generated locally and deterministically, with several
        distinct domains), ``files`` (local text / JSONL / Parquet ``files``) or ``hub``
        (a Hugging Face dataset ``hub_name``, needs network access).
    files: local paths (``source: files``); ``format`` ``auto`` picks by extension.
    text_field: the column holding the text (JSONL, Parquet, hub datasets).
    tokenizer: a trained sentencepiece ``.model`` to load; null trains one with
        ``model.vocab_size`` pieces on the training split (cached).
    seq_len: tokens per packed training sequence (documents are joined with EOS).
    eval_fraction: share of documents held out for evaluation (split by document).
    seed: seeds the held-out split and the per-epoch shuffling of sequences.
    embedded_docs: documents in the embedded corpus.
    max_documents: read at most this many documents (null: all).
    cache_dir: where tokenizer and token arrays are cached (null: ``<output_dir>/data``).
    """

    source: str = spec("embedded", choices=DATA_SOURCES)
    files: Sequence[str] = ()
    format: str = spec("auto", choices=FILE_FORMATS)
    text_field: str = spec("text", nonempty=True)
    hub_name: str | None = spec(None, nonempty=True)
    hub_config: str | None = None
    hub_split: str = spec("train", nonempty=True)
    tokenizer: str | None = spec(None, nonempty=True)
    seq_len: int = spec(128, ge=1)
    eval_fraction: float = spec(0.05, ge=0, le=0.5)
    seed: int = spec(1234, ge=0)
    embedded_docs: int = spec(3000, ge=1)
    max_documents: int | None = spec(None, ge=1)
    cache_dir: str | None = spec(None, nonempty=True)

    def __post_init__(self) -> None:
        if isinstance(self.files, str):  # one path written without a list
            object.__setattr__(self, "files", (self.files,))
        check_fields(self)
        object.__setattr__(self, "files", tuple(self.files))
        if self.source == "files" and not self.files:
            raise ConfigError("DataConfig.files is empty: source 'files' needs at least one local file")
        if self.source == "hub" and not self.hub_name:
            raise ConfigError("DataConfig.hub_name is missing: source 'hub' needs a dataset name")


@dataclass(frozen=True)
class LoopConfig:
    """The training loop (YAML section ``train``).

    micro_batch_size: sequences per process per forward; global batch =
        micro_batch_size * grad_accum_steps * world_size.
    lr: peak learning rate; linear warmup over ``warmup_steps`` then cosine decay to
        ``lr * min_lr_ratio`` at ``steps``.
    eval_interval / save_interval: every N optimizer steps (0 disables; both also run at
        the end). keep_last: checkpoints kept on disk.
    grad_clip: clip the global gradient norm to this value (0 disables clipping).
    nonfinite: what a step whose loss or gradient norm is NaN or inf does: ``error`` (stop
        the run naming the step, keep the checkpoints written so far, and say so in
        ``summary.json``) or ``skip`` (leave weights, optimizer state and LR schedule untouched,
        count the step in the log and ``summary.json``, and go on). DeepSpeed fp16 loss-scale
        overflows are skipped by DeepSpeed in both modes and counted apart, not as errors.
    init_from: start from the weights (and model config, and tokenizer) of a consolidated
        megamoe directory, a training checkpoint or an HF MoE model directory, with a fresh
        optimizer at step 0 (see megamoe.train.init_from). ``--resume`` continues a run.
    dead_expert_window: an expert counts as dead (``dead_experts`` in metrics.jsonl) when no
        slot selected it in each of the last this many steps.
    """

    output_dir: str = spec("runs/tiny", nonempty=True)
    steps: int = spec(200, ge=1)
    micro_batch_size: int = spec(8, ge=1)
    grad_accum_steps: int = spec(1, ge=1)
    lr: float = spec(3e-3, gt=0)
    min_lr_ratio: float = spec(0.1, ge=0, le=1)
    warmup_steps: int = spec(20, ge=0)
    weight_decay: float = spec(0.1, ge=0)
    beta1: float = spec(0.9, ge=0, lt=1)
    beta2: float = spec(0.95, ge=0, lt=1)
    adam_eps: float = spec(1e-8, gt=0)
    grad_clip: float = spec(1.0, ge=0)
    seed: int = spec(0, ge=0)
    precision: str = spec("fp32", choices=PRECISIONS)
    device: str = spec("auto", choices=DEVICES)
    eval_interval: int = spec(100, ge=0)
    eval_max_batches: int | None = spec(None, ge=1)
    save_interval: int = spec(100, ge=0)
    keep_last: int = spec(2, ge=1)
    log_interval: int = spec(1, ge=1)
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    threads: int | None = spec(None, ge=1)
    nonfinite: str = spec("error", choices=NONFINITE_POLICIES)
    init_from: str | None = spec(None, nonempty=True)
    dead_expert_window: int = spec(100, ge=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ParallelConfig:
    """How processes split the work.

    backend: ``deepspeed`` (ZeRO via megamoe.integrations.deepspeed, expert parallelism
        via megamoe.parallel) or ``torch`` (one process, or data parallel over
        torch.distributed with every expert on every rank: ``ep_size`` must be 1).
    ep_size: expert-parallel group size; must divide the world size and num_experts.
    zero_stage: DeepSpeed ZeRO stage 0, 1, 2 or 3 (deepspeed backend).
    dist_backend: process-group backend (``auto``: nccl on CUDA, gloo otherwise).
    """

    backend: str = spec("deepspeed", choices=BACKENDS)
    ep_size: int = spec(1, ge=1)
    zero_stage: int = spec(1, choices=(0, 1, 2, 3))
    dist_backend: str = spec("auto", choices=DIST_BACKENDS)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """The whole job (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: Mapping[str, Any] | str | None = spec(None, nonempty=True)
    balancing: AuxFreeBalancingConfig | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.train.precision == "fp16" and (self.parallel.backend != "deepspeed" or self.parallel.zero_stage == 0):
            raise ConfigError(f"train.precision='fp16' is invalid with parallel.backend={self.parallel.backend!r} and "
                              f"parallel.zero_stage={self.parallel.zero_stage}: fp16 (dynamic loss scaling) needs "
                              "parallel.backend=deepspeed with zero_stage 1, 2 or 3; use precision bf16 or fp32 otherwise")
        if (self.train.nonfinite == "skip" and self.parallel.backend == "deepspeed" and self.parallel.zero_stage == 0
                and self.train.precision == "fp32"):
            raise ConfigError("train.nonfinite='skip' is invalid with parallel.backend='deepspeed', zero_stage=0 and "
                              "precision fp32: that DeepSpeed optimizer applies a non-finite step instead of dropping "
                              "it; use zero_stage 1, 2 or 3, precision bf16, or parallel.backend=torch")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is invalid: must be <= "
                              f"model.max_seq_len={self.model.max_seq_len}")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``[(["a", "b"], 1), (["c"], [1, 2])]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is invalid: write key=value with a dotted key, "
                              "e.g. train.steps=50")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        out.append((key.split("."), value))
    return out


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted ``key=value`` overrides applied."""
    data: dict[str, Any] = copy.deepcopy(dict(raw))
    for path, value in parse_overrides(overrides):
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is a value, "
                                  "not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping of sections in config file ``path`` (ConfigError naming the file for a
    missing, non-UTF-8, malformed or empty file, or one not holding a mapping)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        with open(path, "rb") as f:
            line = f.read()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {exc.start}, line {line}); save it as "
                          "UTF-8 YAML") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {path!r} holds no settings (it is empty or only comments); write the "
                          "sections to set, or leave out --config to use all defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def config_from_mapping(data: Mapping[str, Any]) -> TrainConfig:
    """Build and fully validate a TrainConfig (router options and balancer options included)."""
    cfg = from_dict(TrainConfig, data)
    from megamoe.routing.base import router_options
    router_options(cfg.model.moe.router)  # an unknown router name
    _check_data_files(cfg.data)
    _check_backend_available(cfg)
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; None = all defaults), apply overrides, validate."""
    raw = read_yaml(path) if path else {}
    from megamoe.train.init_from import apply_init_from  # train.init_from supplies the model section
    try:
        return config_from_mapping(apply_init_from(apply_overrides(raw, overrides)))
    except ConfigError as exc:
        if not path:
            raise
        source = f"config file {path!r}" + (" with its overrides" if overrides else "")
        raise ConfigError(f"{exc} [{source}]") from None


def _check_data_files(data: DataConfig) -> None:
    if data.source == "files":
        missing = [f for f in data.files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"data.files: no such file(s): {', '.join(missing)}")
    if data.tokenizer is not None and not os.path.isfile(data.tokenizer):
        raise ConfigError(f"data.tokenizer={data.tokenizer!r}: no such file (give a sentencepiece .model "
                          "made by `megamoe tokenizer`, or null to train one)")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _check_backend_available(cfg: TrainConfig) -> None:
    if cfg.parallel.backend == "deepspeed":
        missing = [m for m in ("deepspeed", "megamoe.integrations.deepspeed", "megamoe.parallel")
                   if not _module_exists(m)]
        if missing:
            raise ConfigError(
                f"parallel.backend='deepspeed' needs the module(s) {', '.join(missing)}, which this "
                "installation lacks; use parallel.backend=torch (with parallel.ep_size=1) instead")


def deepspeed_mapping(cfg: TrainConfig) -> dict[str, Any]:
    """The user's DeepSpeed config section as a dict (reading the referenced file if a path)."""
    ds = cfg.deepspeed
    if ds is None:
        return {}
    from megamoe.integrations.deepspeed import load_ds_config
    try:
        return load_ds_config(ds)
    except ValueError as exc:
        raise ConfigError(f"deepspeed={ds!r}: {exc}") from exc


# What a run may change when it resumes a checkpoint; each takes effect from the resumed step
# on (the LR schedule is rebuilt from train.lr, warmup_steps, min_lr_ratio and steps). Every
# other difference from the checkpoint's config is refused by name: it would not apply (Adam's
# state keeps the old betas and eps, the RNG streams the old seed) or would make the resumed run
# another experiment (other data, tokenizer, precision or balancer) under the same name.
RESUME_CHANGEABLE = (
    "train.steps", "train.lr", "train.warmup_steps", "train.min_lr_ratio", "train.grad_clip",
    "train.micro_batch_size", "train.grad_accum_steps", "train.eval_interval", "train.eval_max_batches",
    "train.save_interval", "train.keep_last", "train.log_interval", "train.tensorboard", "train.plots",
    "train.progress", "train.threads", "train.device", "train.nonfinite", "train.output_dir", "train.dead_expert_window",
    "data.cache_dir",
    "parallel.ep_size", "parallel.zero_stage", "parallel.dist_backend")
LR_SCHEDULE_FIELDS = ("train.lr", "train.warmup_steps", "train.min_lr_ratio", "train.steps")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def resume_changes(saved: Mapping[str, Any] | None, cfg: TrainConfig, *,
                   checkpoint: str) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (checkpoint's value, this run's value)}`` for every setting ``cfg``
    changes relative to the config saved in ``checkpoint`` (the model section is compared on
    its own); ConfigError naming each change outside RESUME_CHANGEABLE. Fields one of the two
    configs does not know (written by another megamoe version) are not compared."""
    if not saved:
        return {}
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = {k: (old[k], new[k]) for k in old if k in new and not k.startswith("model.") and old[k] != new[k]}
    refused = [k for k in changed if k not in RESUME_CHANGEABLE]
    if refused:
        raise ConfigError(
            f"--resume: {', '.join(f'{k}={changed[k][1]!r}' for k in refused)} cannot change on resume (checkpoint "
            f"{checkpoint!r} was trained with {', '.join(f'{k}={changed[k][0]!r}' for k in refused)}); resume with "
            f"the checkpoint's values or start a new run. Settings that may change on resume: "
            f"{', '.join(RESUME_CHANGEABLE)}")
    return changed


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """Raise ConfigError if ``cfg`` cannot run on ``world_size`` processes."""
    p, m = cfg.parallel, cfg.model
    if world_size < 1:
        raise ConfigError(f"world size {world_size} is invalid: must be >= 1")
    if p.backend == "torch" and p.ep_size != 1:
        raise ConfigError(f"parallel.ep_size={p.ep_size} is invalid with parallel.backend='torch', which keeps "
                          "every expert on every rank: set parallel.ep_size=1 or use parallel.backend=deepspeed")
    if world_size % p.ep_size != 0:
        raise ConfigError(f"parallel.ep_size={p.ep_size} does not fit the world size {world_size}: it must "
                          f"divide the number of processes (launch a multiple of {p.ep_size} processes, or "
                          "lower ep_size)")
    if m.moe.num_experts % p.ep_size != 0:
        raise ConfigError(f"parallel.ep_size={p.ep_size} is invalid: it must divide model.moe.num_experts="
                          f"{m.moe.num_experts}")


def world_size_from_env() -> int:
    """The launcher's world size (torchrun / deepspeed / SLURM set WORLD_SIZE), else 1."""
    try:
        launched = launcher_world_size()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return 1 if launched is None else launched


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["TrainConfig", "DataConfig", "LoopConfig", "ParallelConfig", "load_config", "apply_overrides",
           "parse_overrides", "check_world_size", "config_from_mapping", "deepspeed_mapping", "dump_config",
           "world_size_from_env", "resume_changes", "RESUME_CHANGEABLE"]
