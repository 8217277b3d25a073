"""Configuration dataclasses for megamoe components.

Each component has one small frozen dataclass, validated on construction. A YAML mapping
maps 1:1 onto these classes through :func:`from_dict`, which rejects unknown keys with a
did-you-mean suggestion. Router-specific settings live in ``RouterConfig.options`` and are
validated by the options dataclass the router registered (see ``megamoe.routing.base``).
"""
from __future__ import annotations

import dataclasses
import re
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_tanh", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
EXPERT_IMPLS = ("auto", "grouped", "loop")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: Any) -> Any:
    """Parse YAML text (or a stream) safely, reading ``3e-4`` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


def _fail(cls_name: str, field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{cls_name}.{field_name}={value!r} is invalid: {allowed}")


def _check_choice(cls_name: str, field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(cls_name, field_name, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_positive_int(cls_name: str, field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(cls_name, field_name, value, "must be a positive integer")


def _check_nonneg_float(cls_name: str, field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        _fail(cls_name, field_name, value, "must be a number >= 0")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens are assigned to experts.

    name: a registered router (``megamoe.routing.known_routers()``).
    top_k: experts per token (token-choice routers).
    score_func: ``softmax`` or ``sigmoid``, computed in fp32.
    normalize_weights: renormalise the selected top-k scores to sum to 1.
    jitter_eps: multiplicative input jitter U(1-eps, 1+eps) in training (Switch).
    aux_loss_coef: Switch/GShard load-balancing loss coefficient (0 disables).
    z_loss_coef: router z-loss coefficient (0 disables).
    capacity_factor: None for dropless; else C = ceil(T*K/E * capacity_factor).
    eval_capacity_factor: the capacity factor in eval mode (``topk`` routers only): None =
        the same as ``capacity_factor``, a number > 0, or ``"dropless"`` (as DeepSpeed's
        ``eval_capacity_factor``; e.g. train with drops, evaluate and generate dropless).
    drop_policy: which slots an over-full expert keeps: ``probs`` (highest score) or
        ``position`` (earliest token; causal within a sequence, see megamoe/routing/topk.py).
    options: router-specific settings, validated by the router's options dataclass.
    routed_scaling_factor: multiplies the routed experts' combine weights (after any
        renormalisation; shared experts are not scaled), as DeepSeek-V3 / GLM-4-MoE do.
        ``topk`` router only.
    """

    name: str = "topk"
    top_k: int = 2
    score_func: str = "softmax"
    normalize_weights: bool = True
    jitter_eps: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    options: Mapping[str, Any] = field(default_factory=dict)
    routed_scaling_factor: float = 1.0
    eval_capacity_factor: float | str | None = None

    def __post_init__(self) -> None:
        n = type(self).__name__
        if not isinstance(self.name, str) or not self.name:
            _fail(n, "name", self.name, "must be a non-empty router name")
        _check_positive_int(n, "top_k", self.top_k)
        _check_choice(n, "score_func", self.score_func, SCORE_FUNCS)
        _check_choice(n, "drop_policy", self.drop_policy, DROP_POLICIES)
        _check_nonneg_float(n, "aux_loss_coef", self.aux_loss_coef)
        _check_nonneg_float(n, "z_loss_coef", self.z_loss_coef)
        _check_nonneg_float(n, "jitter_eps", self.jitter_eps)
        if self.jitter_eps >= 1:
            _fail(n, "jitter_eps", self.jitter_eps, "must be in [0, 1)")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf <= 0:
                _fail(n, "capacity_factor", cf, "must be > 0, or null for dropless routing")
        if not isinstance(self.options, Mapping):
            _fail(n, "options", self.options, "must be a mapping of router-specific settings")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not rsf > 0 or rsf == float("inf"):
            _fail(n, "routed_scaling_factor", rsf, "must be a finite number > 0")
        if rsf != 1.0 and self.name != "topk":
            _fail(n, "routed_scaling_factor", rsf, f"only the 'topk' router scales its weights (router "
                  f"{self.name!r} needs 1.0)")
        ecf = self.eval_capacity_factor
        if ecf is not None and ecf != "dropless" and (
                isinstance(ecf, bool) or not isinstance(ecf, (int, float)) or ecf <= 0):
            _fail(n, "eval_capacity_factor", ecf, "must be a number > 0, 'dropless', or null (same as "
                  "capacity_factor)")

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor in force in training or eval mode (None: dropless)."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return None if self.eval_capacity_factor == "dropless" else float(self.eval_capacity_factor)


@dataclass(frozen=True)
class ExpertConfig:
    """The expert MLPs.

    intermediate_size: I, the hidden width of one expert.
    activation: ``swiglu``/``geglu`` (gated: gate_up_proj [E, 2I, H]) or ``gelu``,
        ``gelu_tanh``, ``relu`` (plain: up_proj [E, I, H]).
    bias: add biases to both projections.
    impl: ``grouped`` (torch._grouped_mm), ``loop`` (one GEMM per expert), or ``auto``
        (grouped on CUDA where shapes allow, loop otherwise: measured faster on CPU).
    """

    intermediate_size: int
    activation: str = "swiglu"
    bias: bool = False
    impl: str = "auto"

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_positive_int(n, "intermediate_size", self.intermediate_size)
        _check_choice(n, "activation", self.activation, ACTIVATIONS)
        _check_choice(n, "impl", self.impl, EXPERT_IMPLS)
        if not isinstance(self.bias, bool):
            _fail(n, "bias", self.bias, "must be true or false")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer.

    hidden_size: H, the model width the layer reads and writes.
    num_experts: E, routed experts (across all expert-parallel ranks).
    num_shared_experts: dense experts every token always goes through (0 = none); they are
        fused into one MLP of width ``shared_intermediate_size``.
    shared_intermediate_size: defaults to ``num_shared_experts * experts.intermediate_size``.
    shared_expert_gate: scale the shared expert by sigmoid(x w) (Qwen2-MoE style).
    """

    hidden_size: int
    num_experts: int
    experts: ExpertConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_positive_int(n, "hidden_size", self.hidden_size)
        _check_positive_int(n, "num_experts", self.num_experts)
        if not isinstance(self.experts, ExpertConfig):
            _fail(n, "experts", self.experts, "must be an ExpertConfig")
        if not isinstance(self.router, RouterConfig):
            _fail(n, "router", self.router, "must be a RouterConfig")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
            _fail(n, "num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        if self.shared_intermediate_size is not None:
            _check_positive_int(n, "shared_intermediate_size", self.shared_intermediate_size)
        if self.router.top_k > self.num_experts:
            raise ConfigError(
                f"RouterConfig.top_k={self.router.top_k} is invalid: must be <= "
                f"MoEConfig.num_experts={self.num_experts}")

    @property
    def shared_size(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        return self.shared_intermediate_size or self.num_shared_experts * self.experts.intermediate_size


T = typing.TypeVar("T")


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested config dataclasses.

    Unknown keys raise ConfigError naming the key, a did-you-mean, and the known keys.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            path = f"{where}.{key}" if where else key
            raise ConfigError(
                f"unknown config key {path!r}{_suggest(key, fields)}; "
                f"known keys of {cls.__name__}: {', '.join(sorted(fields))}")
        hint = hints[key]
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, where=f"{where}.{key}" if where else key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        missing = [f.name for f in fields.values()
                   if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        raise ConfigError(f"{where or cls.__name__}: missing required keys {missing}") from exc


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Inverse of :func:`from_dict` (plain dicts, suitable for YAML/JSON)."""
    out = dataclasses.asdict(cfg)
    return _plain(out)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
