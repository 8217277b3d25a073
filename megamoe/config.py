"""Configuration dataclasses for megamoe components.

Each component has one small frozen dataclass, validated on construction. A YAML mapping
maps 1:1 onto these classes through :func:`from_dict`, which rejects unknown keys with a
did-you-mean suggestion. Router-specific settings live in ``RouterConfig.options``: an
instance of the options dataclass the router registered with its name (see
``megamoe.routing.base.register_router``), built from a mapping and validated here. Keys of an
older layout are moved to their place with one :class:`ConfigLayoutWarning`.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_tanh", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
EXPERT_IMPLS = ("auto", "triton", "grouped", "loop")


class _Loader(yaml.SafeLoader):
    """Strict YAML for configs: only ``true``/``false`` are booleans (YAML 1.1 would read ``yes``,
    ``no``, ``on``, ``off`` as booleans too, so ``tie_embeddings: maybe`` and ``yes`` looked
    alike), ``3e-4`` is a float (YAML 1.1 reads it as a string without a dot), and a key given
    twice in one mapping is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: Any) -> Any:
    """Parse YAML text (or a stream) with the strict config rules of :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


# ----------------------------------------------------------------------------- field constraints
# Every config dataclass declares what each field accepts where the field is defined: the type
# hint says the kind (strictly: bools are only true/false, ints only ints, floats only finite
# numbers, None only where the hint has ``| None``) and ``spec(...)`` adds bounds, choices or
# non-emptiness. ``check_fields(self)``, first thing in every ``__post_init__``, enforces both,
# so constructing from Python and loading YAML through :func:`from_dict` share one path.
_SPEC_KEY = "megamoe.spec"


@dataclass(frozen=True)
class Spec:
    """What a field accepts beyond its type hint.

    ge/gt/le/lt: bounds for every number the field holds (a scalar, or each list element).
    choices: the allowed values of the hint's kind they match (strings or integers); a field
        typed ``float | str`` with ``choices=("dropless",)`` takes numbers or that string.
    nonempty: strings must hold a non-blank character, lists at least one element.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False

    def in_bounds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def bounds_text(self) -> str:
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None
               else None)
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None
                else None)
        if low and high:
            return f" in {low}, {high}"
        if low:
            return f" {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f" {'<=' if self.le is not None else '<'} {high[:-1]}"
        return ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def spec(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
         ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
         choices: typing.Sequence[Any] | None = None, nonempty: bool = False) -> Any:
    """A dataclass field with a :class:`Spec` (see the section comment above)."""
    meta = {_SPEC_KEY: Spec(ge=ge, gt=gt, le=le, lt=lt, choices=tuple(choices) if choices is not None else None,
                            nonempty=nonempty)}
    return field(default=default, default_factory=default_factory, metadata=meta)  # type: ignore[call-overload]


_NO_SPEC = Spec()


@functools.lru_cache(maxsize=None)
def _field_table(cls: type) -> dict[str, tuple[Any, Spec]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get(_SPEC_KEY, _NO_SPEC)) for f in dataclasses.fields(cls)}


def field_spec(cls: type, name: str) -> tuple[Any, Spec]:
    """(type hint, Spec) of field ``name`` of config dataclass ``cls``."""
    return _field_table(cls)[name]


def check_fields(cfg: Any) -> None:
    """Check every field of the config dataclass instance ``cfg`` against its type hint and
    :class:`Spec`; raise ConfigError naming ``ClassName.field`` and what it accepts."""
    cls = type(cfg)
    for name in _field_table(cls):
        check_field(cls, name, getattr(cfg, name))


def check_field(cls: type, name: str, value: Any, *, where: str | None = None) -> None:
    """Check one value for field ``name`` of ``cls`` (``where``: the dotted path of the field's
    owner in messages, default the class name)."""
    hint, sp = field_spec(cls, name)
    if not _accepts(hint, value, sp):
        raise ConfigError(f"{where if where is not None else cls.__name__}.{name}={value!r} is invalid: "
                          f"{describe(hint, sp)}")


def _alternatives(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _sequence_item(hint: Any) -> Any | None:
    """The element type of a list-like hint (``Sequence[X]``, ``tuple[X, ...]``), else None."""
    origin = typing.get_origin(hint)
    if origin in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(hint)
        return args[0] if args else Any
    return None


def _choice_applies(sp: Spec, value: Any) -> bool:
    return sp.choices is not None and any(type(c) is type(value) for c in sp.choices)


def _accepts(hint: Any, value: Any, sp: Spec) -> bool:
    for alt in _alternatives(hint):
        if alt is Any:
            return True
        if alt is type(None):
            if value is None:
                return True
        elif alt is bool:
            if isinstance(value, bool):
                return True
        elif alt in (int, float):
            if isinstance(value, bool) or not isinstance(value, int if alt is int else (int, float)):
                continue
            if _choice_applies(sp, value):
                if value in sp.choices:  # type: ignore[operator]
                    return True
                continue
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if finite and sp.in_bounds(value):
                return True
        elif alt is str:
            if not isinstance(value, str):
                continue
            if _choice_applies(sp, value):
                if value in sp.choices:  # type: ignore[operator]
                    return True
            elif not sp.nonempty or value.strip():
                return True
        elif _sequence_item(alt) is not None:
            if isinstance(value, (list, tuple)) and (value or not sp.nonempty) and all(
                    _accepts(_sequence_item(alt), v, dataclasses.replace(sp, choices=None, nonempty=False))
                    for v in value):
                return True
        elif typing.get_origin(alt) in (collections.abc.Mapping, dict) or alt in (collections.abc.Mapping, dict):
            if isinstance(value, collections.abc.Mapping):
                return True
        elif isinstance(alt, type):
            if isinstance(value, alt):
                return True
        else:  # pragma: no cover - a hint this checker does not know: a programming error
            raise TypeError(f"config field type {alt!r} is not supported by megamoe.config.check_field")
    return False


def describe(hint: Any, sp: Spec = _NO_SPEC) -> str:
    """What a field with this hint and Spec accepts, in words (used in error messages)."""
    alts = _alternatives(hint)
    choice_only = sp.choices is not None and all(
        a is type(None) or any(type(c) is a for c in sp.choices) for a in alts)
    if choice_only:
        text = "allowed values are " + ", ".join(map(repr, sp.choices))  # type: ignore[arg-type]
        return text + (", or null" if type(None) in alts else "")
    words = [_describe_one(a, sp) for a in alts if a is not type(None)]
    if type(None) in alts:
        words.append("null")
    joined = words[0] if len(words) == 1 else ", ".join(words[:-1]) + ", or " + words[-1]
    return "must be " + joined


def _describe_one(alt: Any, sp: Spec, plural: bool = False) -> str:
    if alt is Any:
        return "anything"
    if alt is bool:
        return "true or false"
    if alt in (int, float):
        if _choice_applies(sp, 0 if alt is int else 0.0):
            return "one of " + ", ".join(repr(c) for c in sp.choices if type(c) is alt)  # type: ignore[union-attr]
        noun = ("integers" if plural else "an integer") if alt is int else ("finite numbers" if plural
                                                                           else "a finite number")
        return noun + sp.bounds_text()
    if alt is str:
        if _choice_applies(sp, ""):
            return ", ".join(repr(c) for c in sp.choices if isinstance(c, str))  # type: ignore[union-attr]
        return ("non-empty strings" if plural else "a non-empty string") if sp.nonempty else (
            "strings" if plural else "a string")
    item = _sequence_item(alt)
    if item is not None:
        inner = " or ".join(_describe_one(a, dataclasses.replace(sp, choices=None, nonempty=False), plural=True)
                            for a in _alternatives(item))
        return f"{'a non-empty list' if sp.nonempty else 'a list'} of {inner}"
    if typing.get_origin(alt) in (collections.abc.Mapping, dict) or alt in (collections.abc.Mapping, dict):
        return "a mapping"
    if dataclasses.is_dataclass(alt):
        return f"a mapping of {alt.__name__} fields"
    return getattr(alt, "described_as", None) or getattr(alt, "__name__", repr(alt))


def check_arg(owner: str, name: str, value: Any, hint: Any, **bounds: Any) -> None:
    """Check a constructor argument by the rules of a config field typed ``hint`` and declared
    ``spec(**bounds)``; ValueError naming ``owner`` and the argument."""
    sp = Spec(**bounds)
    if not _accepts(hint, value, sp):
        raise ValueError(f"{owner}: {name}={value!r} is invalid: {describe(hint, sp)}")


def require_config(owner: str, config: Any, cls: type) -> None:
    """TypeError unless ``config`` is a ``cls`` instance, saying how to build one from a mapping."""
    if not isinstance(config, cls):
        raise TypeError(f"{owner} needs a megamoe.{cls.__name__}, got {type(config).__name__}; build one with "
                        f"{cls.__name__}(...) or, from a mapping, megamoe.from_dict({cls.__name__}, {{...}})")


def arg_type(kind: type, **bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` for a command-line option: parse the text as ``kind`` (``int`` or
    ``float``) and check it by the same rules as a config field declared ``spec(**bounds)``,
    so options and config fields share one constraint language and one wording."""
    sp = Spec(**bounds)

    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            value = text
        if not _accepts(kind, value, sp):
            raise argparse.ArgumentTypeError(f"{describe(kind, sp)}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


# ----------------------------------------------------------------------------- routers
# Every router registers the dataclass of its own options with its name
# (``megamoe.routing.base.register_router(name, options=...)``); ``RouterConfig.options`` holds an
# instance of it. The table lives here so that a config can be built and validated from YAML
# without importing the routers (``import megamoe`` registers the built-in ones).
_ROUTER_OPTIONS: dict[str, type | None] = {}


class RouterOptions:
    """Base of every router's options dataclass (``TopKOptions``, ``ExpertChoiceOptions``, ...):
    what ``RouterConfig.options`` holds once the config is built."""

    described_as = "the router's options (its RouterOptions dataclass)"  # in "must be ..." messages


def register_router_options(name: str, options: type | None) -> None:
    """Record that router ``name`` takes ``options`` (a RouterOptions dataclass, or None)."""
    _ROUTER_OPTIONS[name] = options


# The token-choice options a router may lack, with the value that means "not used", and why a
# router without them refuses any other value (the same words as when they were RouterConfig's).
_TOKEN_CHOICE_DEFAULTS: dict[str, Any] = {"score_func": "softmax", "normalize_weights": True,
                                          "capacity_factor": None, "eval_capacity_factor": None,
                                          "drop_policy": "probs", "routed_scaling_factor": 1.0}
_NOT_USED_BECAUSE = {
    "eval_capacity_factor": "only token-choice top-k routers ('topk', 'compete') use it; set it to null",
    "routed_scaling_factor": "only the 'topk' router scales its weights (router {name!r} needs 1.0)",
    "score_func": "its scores are a softmax (it has no score_func option); leave it out or set score_func: softmax",
}


def resolve_router_options(name: str, options: Any, *, where: str) -> Any:
    """``options`` (a mapping, or an instance of the router's options class) as router
    ``name``'s typed options; ConfigError naming ``where`` otherwise. The token-choice keys
    a router lacks are accepted at their "not used" value (configs written when they were
    every router's fields carry them) and refused by name at any other."""
    if name not in _ROUTER_OPTIONS:
        return options  # an unknown router: build_router names the known ones
    cls = _ROUTER_OPTIONS[name]
    if isinstance(options, Mapping):
        mapping = dict(options)
        fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
        for key in [k for k in mapping if k not in fields and k in _TOKEN_CHOICE_DEFAULTS]:
            value = mapping.pop(key)
            if value != _TOKEN_CHOICE_DEFAULTS[key]:
                why = _NOT_USED_BECAUSE.get(key, "it has no such option; remove it (its options: "
                                                 + (", ".join(sorted(fields)) or "none") + ")")
                raise ConfigError(f"{where}.{key}={value!r} is invalid for router {name!r}: {why.format(name=name)}")
        if cls is None:
            if mapping:
                raise ConfigError(f"{where}={mapping!r} is invalid: router {name!r} takes no options")
            return None
        return from_dict(cls, mapping, where=where)
    if cls is None:
        raise ConfigError(f"{where}={options!r} is invalid: router {name!r} takes no options")
    if not isinstance(options, cls):
        raise ConfigError(f"{where}={options!r} is invalid: router {name!r} takes {cls.__name__} "
                          f"({cls.__module__}); pass {cls.__name__}(...) or a mapping of its fields")
    return options


@dataclass(frozen=True)
class RouterConfig:
    """How tokens are assigned to experts.

    name: a registered router (``megamoe.routing.known_routers()``).
    top_k: experts per token (token-choice routers; 1 for skip, balanced and stochastic).
    jitter_eps: multiplicative input jitter U(1-eps, 1+eps) in training (Switch).
    aux_loss_coef: Switch/GShard load-balancing loss coefficient (0 disables).
    z_loss_coef: router z-loss coefficient (0 disables).
    options: the router's own settings: an instance of the options dataclass it registered
        (``megamoe.routing.topk.TopKOptions`` for ``topk``: score function, weight
        normalisation, capacity and drop policy, routed scaling; ``ExpertChoiceOptions``,
        ``SkipOptions``, ``BalancedOptions``, ``CompeteOptions``, ``StochasticOptions``), or a
        mapping of its fields (YAML), validated here; omitted: the router's defaults.

    Configs written before options were typed kept the top-k settings beside ``top_k``
    (``router: {top_k: 2, score_func: sigmoid}``); :func:`from_dict` moves them into
    ``options`` and says so (:class:`ConfigLayoutWarning`).
    """

    name: str = spec("topk", nonempty=True)
    top_k: int = spec(2, ge=1)
    jitter_eps: float = spec(0.0, ge=0, lt=1)
    aux_loss_coef: float = spec(0.01, ge=0)
    z_loss_coef: float = spec(0.0, ge=0)
    options: RouterOptions | Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "options", resolve_router_options(self.name, self.options,
                                                                   where=f"{type(self).__name__}.options"))

    @classmethod
    def _migrate(cls, data: dict[str, Any], where: str) -> list[tuple[str, str]]:
        """Old flat top-k keys -> ``options`` (in place); returns (old, new) dotted paths."""
        moved = [k for k in _TOKEN_CHOICE_DEFAULTS if k in data]
        if not moved:
            return []
        options = data.get("options")
        options = dict(options) if isinstance(options, Mapping) else {}
        for key in moved:
            merge_moved(options, key, data.pop(key))
        data["options"] = options
        base = f"{where}." if where else ""
        return [(f"{base}{k}", f"{base}options.{k}") for k in moved]


@dataclass(frozen=True)
class ExpertConfig:
    """The expert MLPs.

    intermediate_size: I, the hidden width of one expert.
    activation: ``swiglu``/``geglu`` (gated: gate_up_proj [E, 2I, H]) or ``gelu``,
        ``gelu_tanh``, ``relu`` (plain: up_proj [E, I, H]).
    bias: add biases to both projections.
    impl: ``triton`` (torch._grouped_mm with the Triton kernels of ``megamoe.kernels`` for
        permute, weighted activation and combine; needs ``pip install megamoe[triton]``),
        ``grouped`` (torch._grouped_mm, plain torch glue), ``loop`` (one GEMM per expert), or
        ``auto`` (triton, else grouped, on CUDA where shapes allow; loop otherwise: measured
        faster on CPU).
    """

    intermediate_size: int = spec(ge=1)
    activation: str = spec("swiglu", choices=ACTIVATIONS)
    bias: bool = False
    impl: str = spec("auto", choices=EXPERT_IMPLS)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer.

    hidden_size: H, the model width the layer reads and writes (inside a ``ModelConfig``:
        leave it unset, it is the model's ``hidden_size``).
    num_experts: E, routed experts (across all expert-parallel ranks).
    num_shared_experts: dense experts every token always goes through (0 = none); they are
        fused into one MLP of width ``shared_intermediate_size``.
    shared_intermediate_size: defaults to ``num_shared_experts * experts.intermediate_size``.
    shared_expert_gate: scale the shared expert by sigmoid(x w) (Qwen2-MoE style).
    """

    hidden_size: int | None = spec(None, ge=1)
    num_experts: int = spec(ge=1)
    experts: ExpertConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    num_shared_experts: int = spec(0, ge=0)
    shared_intermediate_size: int | None = spec(None, ge=1)
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
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


class ConfigLayoutWarning(FutureWarning):
    """A config (a YAML file, an override, a checkpoint's stored config) used keys of an older
    layout; they were read in the current one. The message lists what moved where."""


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested config dataclasses.

    ``where`` is the dotted path of ``data`` in the whole config (``"model.moe.router"``); every
    error names the offending key by that path: unknown keys (with a did-you-mean and the
    known keys), a section that is not a mapping, and the values the class's own checks
    refuse (its ``ClassName.field`` messages are re-addressed to ``where.field``).

    Older layouts: a class with a ``_migrate(data, where)`` classmethod moves the keys of its
    older layout to where they live now (``ModelConfig``: the MoE fields into ``moe``;
    ``RouterConfig``: the top-k fields into ``options``); one :class:`ConfigLayoutWarning` then
    lists every key that moved.
    """
    moved: list[tuple[str, str]] = []
    try:
        return _from_dict(cls, data, where, moved)
    finally:  # also when the config is refused: its error names the keys' new places
        if moved:
            warnings.warn(ConfigLayoutWarning(
                "this config uses keys of an older megamoe layout, read as: "
                + ", ".join(f"{old} -> {new}" for old, new in _as_written(moved))
                + " (write them there to silence this; see the README, 'Config layout')"), stacklevel=2)


def _as_written(moved: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``moved`` with each old path spelled as the config wrote it: a key found inside a section
    that itself moved (``model.router`` -> ``model.moe.router``, then its ``score_func``) is named
    at the section's old place (``model.router.score_func``)."""
    out: list[tuple[str, str]] = []
    for old, new in moved:
        section = next(((o, n) for o, n in out if old.startswith(n + ".")), None)
        out.append((section[0] + old[len(section[1]):] if section else old, new))
    return out


def _from_dict(cls: type[T], data: Mapping[str, Any], where: str, moved: list[tuple[str, str]]) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}" + (" is empty (null)" if data is None else f"={data!r} is invalid")
                          + f": it must be a mapping of {cls.__name__} fields")
    migrate = getattr(cls, "_migrate", None)
    if migrate is not None:
        data = dict(data)
        moved.extend(migrate(data, where))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown config key {path!r}{_suggest(str(key), fields)}; "
                f"known keys of {cls.__name__}: {', '.join(sorted(fields))}")
        hint = hints[key]
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(value, Mapping):
            value = _from_dict(sub, value, path, moved)
        elif sub is not None and not isinstance(value,
                                                sub) and not (value is None and type(None) in _alternatives(hint)):
            has_default = (fields[key].default is not dataclasses.MISSING
                           or fields[key].default_factory is not dataclasses.MISSING)  # type: ignore[misc]
            raise ConfigError((f"{path} is empty (null)" if value is None else f"{path}={value!r} is invalid")
                              + f": it must be a section (a mapping of {sub.__name__} fields)"
                              + ("; leave it out for the defaults" if has_default else ""))
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise _readdressed(exc, cls, where) from None
    except TypeError as exc:  # missing required fields
        missing = [f.name for f in fields.values()
                   if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        raise ConfigError(f"{where or cls.__name__}: missing required keys {missing}") from exc


def merge_moved(target: dict[str, Any], key: str, value: Any) -> None:
    """Put an old-layout ``value`` at ``target[key]``; mappings merge, the old value winning where
    both set a key (an old-layout override given after a new-layout file)."""
    current = target.get(key)
    if isinstance(current, Mapping) and isinstance(value, Mapping):
        merged = dict(current)
        for k, v in value.items():
            merge_moved(merged, k, v)
        target[key] = merged
    else:
        target[key] = value


def _readdressed(exc: ConfigError, cls: type, where: str) -> ConfigError:
    """``exc`` with ``ClassName.`` (fields of the instance being built) replaced by the dotted
    path ``where.``."""
    msg = str(exc)
    own = re.compile(rf"\b{re.escape(cls.__name__)}\.")
    if not own.search(msg):
        return exc
    return ConfigError(own.sub(f"{where}." if where else "", msg))


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Inverse of :func:`from_dict` (plain dicts, suitable for YAML/JSON). A class with a
    ``_trim_dict(data)`` method leaves out what it derives from its other fields (a
    ``ModelConfig`` its ``moe.hidden_size``, which is always the model's)."""
    return _plain(cfg)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        trim = getattr(obj, "_trim_dict", None)
        return trim(out) if trim is not None else out
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
