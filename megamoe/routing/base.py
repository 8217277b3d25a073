"""The router interface: RoutingDecision, RoutingContext, the Router base class and registry.

Shape legend: T tokens (batch and sequence flattened), D hidden size, E experts,
K slots per token (for token-choice routers the top-k; other routers may use any K >= 1 and
mark unused slots with expert id -1).

A router maps ``x_TD`` to a :class:`RoutingDecision`. Everything about parallelism lives in
the dispatcher; a router sees only its local tokens. Routers register by name with
:func:`register_router` and are built from a :class:`~megamoe.config.RouterConfig` by
:func:`build_router`. A router declares the dataclass of its own options with its name;
``RouterConfig.options`` holds an instance of it (built from YAML and validated when the
config is), so typos fail at config load, not deep in training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import Tensor, nn

from megamoe.config import (ConfigError, RouterConfig, check_arg, register_router_options, require_config,
                            resolve_router_options)


@dataclass(frozen=True)
class RoutingDecision:
    """Which experts each token goes to, and with what combine weight.

    expert_ids_TK: int64 [T, K]; -1 marks an empty or dropped slot.
    weights_TK: fp32 [T, K] combine weights (0 in empty slots); carries the router's
        gradient.
    tokens_per_expert_E: int64 [E] local count of kept slots per expert (dispatch splits
        and balance statistics).
    aux_loss: scalar, already scaled by its coefficient, or None.
    selected_per_expert_E: int64 [E] slots selected before any capacity drop (what load
        balancers count); defaults to ``tokens_per_expert_E``.
    stats: extra detached per-step statistics a router wants logged (name -> tensor).
    dropless: the router guarantees every slot holds an expert (no -1 anywhere), so the
        number of routed rows is T*K, known from the shapes: dispatch then needs no host
        synchronisation (CUDA graphs, torch.compile). False (the safe default) makes the
        dispatcher read the kept count from ``tokens_per_expert_E``.
    kept_bound: when slots may be dropped, a bound on the number of kept slots known on the
        host (top-k under a capacity C: E*C), or None. A dispatcher whose rows stay local
        sizes its buffers by it instead of reading the kept count back from the device.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    tokens_per_expert_E: Tensor
    aux_loss: Tensor | None = None
    selected_per_expert_E: Tensor | None = None
    stats: Mapping[str, Tensor] = field(default_factory=dict)
    dropless: bool = False
    kept_bound: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def selected_counts_E(self) -> Tensor:
        return self.tokens_per_expert_E if self.selected_per_expert_E is None else self.selected_per_expert_E


@dataclass
class RoutingContext:
    """What the layer tells its router about the current call.

    layer_index: position of the layer in the model (-1 if unknown).
    step: the optimizer step counter the layer was told about (for schedules).
    compute_all_experts: runs every expert on ``x_TD`` and returns ``y_ETD`` (fp32 or
        input dtype). Provided by the layer, so routers that need expert outputs
        (competition routing) work identically whether experts are local or remote.
    causal: the host model is autoregressive; routers that leak future tokens must refuse.
    sequence_length: S when the layer's input was [..., S, D] (tokens are then laid out as
        consecutive sequences of S); None for 2-D input. Causal-safe routers use it to keep
        each token's routing a function of its own sequence prefix.
    """

    layer_index: int = -1
    step: int = 0
    compute_all_experts: Callable[[Tensor], Tensor] | None = None
    causal: bool = False
    sequence_length: int | None = None


class Router(nn.Module):
    """Base class for routers. Subclasses implement :meth:`forward`.

    Parameters a router owns (e.g. ``weight`` [E, D]) are ordinary module parameters;
    non-trainable state (e.g. a load-balancing bias) is a registered buffer.
    """

    @classmethod
    def causal_problem(cls, config: RouterConfig) -> str | None:
        """Why ``config`` leaks later tokens into earlier ones' routing in a causal model, as
        far as the config alone tells (None: nothing known). Causal models check it at config
        load; routers whose leak depends on run-time context also refuse in ``forward``."""
        return None

    def __init__(self, config: RouterConfig, *, hidden_size: int, num_experts: int,
                 options: Any = None) -> None:
        owner = f"{type(self).__name__}"
        require_config(f"{owner}(config)", config, RouterConfig)
        check_arg(owner, "hidden_size", hidden_size, int, ge=1)
        check_arg(owner, "num_experts", num_experts, int, ge=1)
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.options = options

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, hidden_size={self.hidden_size}, num_experts={self.num_experts}"


R = TypeVar("R", bound=type[Router])


@dataclass(frozen=True)
class _Entry:
    cls: type[Router]
    options: type | None


_REGISTRY: dict[str, _Entry] = {}


def register_router(name: str, *, options: type | None = None) -> Callable[[R], R]:
    """Class decorator: make a Router subclass buildable as ``RouterConfig(name=name)``.

    options: the dataclass of this router's ``RouterConfig.options`` (None: it takes none).
    """
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"options for router {name!r} must be a dataclass")

    def deco(cls: R) -> R:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"router name {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        _REGISTRY[name] = _Entry(cls, options)
        register_router_options(name, options)
        return cls

    return deco


def known_routers() -> list[str]:
    _import_builtin_routers()
    return sorted(_REGISTRY)


def router_options(config: RouterConfig) -> Any:
    """The typed options of ``config`` (validated when the config was built); ConfigError for
    an unknown router."""
    _lookup(config.name)
    return config.options


def router_class(config: RouterConfig) -> type[Router]:
    """The registered class of ``config.name`` (ConfigError naming known routers)."""
    return _lookup(config.name).cls


def build_router(config: RouterConfig, *, hidden_size: int, num_experts: int) -> Router:
    """Build the registered router ``config.name``. Raises ConfigError naming known routers."""
    require_config("build_router(config)", config, RouterConfig)
    entry = _lookup(config.name)
    # A router registered after the config was built: its options are still the raw mapping.
    options = resolve_router_options(config.name, config.options, where="RouterConfig.options")
    return entry.cls(config, hidden_size=hidden_size, num_experts=num_experts, options=options)


def _lookup(name: str) -> _Entry:
    _import_builtin_routers()
    if name not in _REGISTRY:
        raise ConfigError(
            f"RouterConfig.name={name!r} is invalid: unknown router; known routers are "
            f"{', '.join(map(repr, sorted(_REGISTRY)))}")
    return _REGISTRY[name]


def _import_builtin_routers() -> None:
    # Importing the package registers every built-in router exactly once.
    import megamoe.routing  # noqa: F401


def counts_per_expert(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """int64 [E] number of slots per expert, ignoring -1 (empty) slots (ids must be < E).

    A scatter-add of ones rather than ``torch.bincount``, which reads the largest id back to
    the host on CUDA (a synchronisation on every routing call); integer sums are exact, so
    the order of the adds does not matter.
    """
    flat = expert_ids_TK.reshape(-1).long()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    # Shift by one so -1 lands in bin 0, which is discarded.
    return counts.scatter_add_(0, flat + 1, torch.ones_like(flat))[1:]


class PrivateDrawsMixin:
    """Random draws from a private generator (``set_draw_seed``) or torch's global RNG (None).

    For routers that sample: a per-router, per-rank seed keeps ranks' draws independent and
    reproducible. The generator's state is not part of the module's state_dict.
    """

    _draw_seed: int | None = None
    _generator: torch.Generator | None = None

    def set_draw_seed(self, seed: int | None) -> None:
        """Draw from a private generator seeded with ``seed`` (None: torch's global RNG)."""
        self._draw_seed = seed
        self._generator = None

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self._draw_seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._draw_seed)
        return self._generator
