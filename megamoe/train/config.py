"""TrainConfig: everything ``megamoe train`` reads, one YAML file mapped 1:1 onto dataclasses.

Sections: ``model`` (megamoe.model.ModelConfig), ``data`` (DataConfig), ``train``
(LoopConfig), ``parallel`` (ParallelConfig), ``deepspeed`` (a DeepSpeed config mapping, or
the path of a JSON/YAML file holding one) and ``balancing`` (options of the auxiliary-loss-free
balancer, or null). :func:`load_config` reads the YAML, applies ``key=value`` overrides with
dotted keys (``train.steps=50``, ``model.router.top_k=1``; values parsed as YAML), and
rejects unknown keys with a did-you-mean. :func:`check_world_size` refuses a config that
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

from megamoe.config import ConfigError, from_dict, to_dict
from megamoe.config import yaml_load as _yaml_load
from megamoe.model import ModelConfig
from megamoe.parallel import DIST_BACKENDS, launcher_world_size

DATA_SOURCES = ("embedded", "files", "hub")
FILE_FORMATS = ("auto", "text", "json", "parquet")
BACKENDS = ("deepspeed", "torch")
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: deepspeed backend, ZeRO 1-3 (dynamic loss scaling)
DEVICES = ("auto", "cpu", "cuda")


def _positive_int(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: must be an integer >= {low}")


def _number(owner: str, name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low \
            or (high is not None and value > high):
        rng = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: must be a number {rng}")


def _choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: allowed values are "
                          f"{', '.join(map(repr, choices))}")


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

    source: str = "embedded"
    files: Sequence[str] = ()
    format: str = "auto"
    text_field: str = "text"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    tokenizer: str | None = None
    seq_len: int = 128
    eval_fraction: float = 0.05
    seed: int = 1234
    embedded_docs: int = 3000
    max_documents: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        n = "data"
        _choice(n, "source", self.source, DATA_SOURCES)
        _choice(n, "format", self.format, FILE_FORMATS)
        _positive_int(n, "seq_len", self.seq_len)
        _number(n, "eval_fraction", self.eval_fraction, low=0.0, high=0.5)
        _positive_int(n, "embedded_docs", self.embedded_docs)
        _positive_int(n, "seed", self.seed, allow_zero=True)
        if self.max_documents is not None:
            _positive_int(n, "max_documents", self.max_documents)
        if isinstance(self.files, str):
            object.__setattr__(self, "files", (self.files,))
        if not all(isinstance(f, str) for f in self.files):
            raise ConfigError(f"{n}.files={self.files!r} is invalid: must be a list of paths")
        object.__setattr__(self, "files", tuple(self.files))
        if self.source == "files" and not self.files:
            raise ConfigError(f"{n}.files is empty: source 'files' needs at least one local file")
        if self.source == "hub" and not self.hub_name:
            raise ConfigError(f"{n}.hub_name is missing: source 'hub' needs a dataset name")


@dataclass(frozen=True)
class LoopConfig:
    """The training loop (YAML section ``train``).

    micro_batch_size: sequences per process per forward; global batch =
        micro_batch_size * grad_accum_steps * world_size.
    lr: peak learning rate; linear warmup over ``warmup_steps`` then cosine decay to
        ``lr * min_lr_ratio`` at ``steps``.
    eval_interval / save_interval: every N optimizer steps (0 disables; both also run at
        the end). keep_last: checkpoints kept on disk.
    """

    output_dir: str = "runs/tiny"
    steps: int = 200
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    eval_interval: int = 100
    eval_max_batches: int | None = None
    save_interval: int = 100
    keep_last: int = 2
    log_interval: int = 1
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        n = "train"
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"{n}.output_dir={self.output_dir!r} is invalid: must be a directory path")
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "keep_last", "log_interval"):
            _positive_int(n, name, getattr(self, name))
        for name in ("warmup_steps", "eval_interval", "save_interval", "seed"):
            _positive_int(n, name, getattr(self, name), allow_zero=True)
        _number(n, "lr", self.lr)
        _number(n, "min_lr_ratio", self.min_lr_ratio, high=1.0)
        _number(n, "weight_decay", self.weight_decay)
        _number(n, "beta1", self.beta1, high=1.0)
        _number(n, "beta2", self.beta2, high=1.0)
        _number(n, "adam_eps", self.adam_eps)
        _number(n, "grad_clip", self.grad_clip)
        _choice(n, "precision", self.precision, PRECISIONS)
        _choice(n, "device", self.device, DEVICES)
        if self.eval_max_batches is not None:
            _positive_int(n, "eval_max_batches", self.eval_max_batches)
        if self.threads is not None:
            _positive_int(n, "threads", self.threads)
        for name in ("tensorboard", "plots", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{n}.{name}={getattr(self, name)!r} is invalid: must be true or false")


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

    backend: str = "deepspeed"
    ep_size: int = 1
    zero_stage: int = 1
    dist_backend: str = "auto"

    def __post_init__(self) -> None:
        n = "parallel"
        _choice(n, "backend", self.backend, BACKENDS)
        _positive_int(n, "ep_size", self.ep_size)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{n}.zero_stage={self.zero_stage!r} is invalid: allowed values are 0, 1, 2, 3")
        _choice(n, "dist_backend", self.dist_backend, DIST_BACKENDS)


@dataclass(frozen=True)
class TrainConfig:
    """The whole job (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: Mapping[str, Any] | str | None = None
    balancing: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.deepspeed is not None and not isinstance(self.deepspeed, (Mapping, str)):
            raise ConfigError(f"deepspeed={self.deepspeed!r} is invalid: must be a mapping (a DeepSpeed "
                              "config) or the path of a JSON/YAML file holding one")
        if self.balancing is not None and not isinstance(self.balancing, Mapping):
            raise ConfigError(f"balancing={self.balancing!r} is invalid: must be a mapping of balancer "
                              "options or null")
        if self.train.precision == "fp16" and (self.parallel.backend != "deepspeed" or self.parallel.zero_stage == 0):
            raise ConfigError(f"train.precision='fp16' is invalid with parallel.backend={self.parallel.backend!r} and "
                              f"parallel.zero_stage={self.parallel.zero_stage}: fp16 (dynamic loss scaling) needs "
                              "parallel.backend=deepspeed with zero_stage 1, 2 or 3; use precision bf16 or fp32 otherwise")
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
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = _yaml_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def config_from_mapping(data: Mapping[str, Any]) -> TrainConfig:
    """Build and fully validate a TrainConfig (router options and balancer options included)."""
    cfg = from_dict(TrainConfig, data)
    from megamoe.routing.base import router_options
    router_options(cfg.model.router)
    _check_data_files(cfg.data)
    _check_backend_available(cfg)
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; None = all defaults), apply overrides, validate."""
    raw = read_yaml(path) if path else {}
    cfg = config_from_mapping(apply_overrides(raw, overrides))
    return cfg


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
    if cfg.balancing is not None:
        if not _module_exists("megamoe.routing.balancing"):
            raise ConfigError("balancing: megamoe.routing.balancing is not available in this installation; "
                              "remove the balancing section or set balancing=null")
        from megamoe.routing import balancing as _bal  # type: ignore[attr-defined]
        from_dict(_bal.AuxFreeBalancingConfig, cfg.balancing, where="balancing")


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
    if m.num_experts % p.ep_size != 0:
        raise ConfigError(f"parallel.ep_size={p.ep_size} is invalid: it must divide model.num_experts="
                          f"{m.num_experts}")


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
           "world_size_from_env"]
