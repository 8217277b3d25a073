"""Drop-in MoE for Hugging Face transformers models.

Shape legend: H hidden size, I dense (and expert) intermediate size, E experts, S shared
expert width.

- :func:`moeify` turns a loaded HF causal LM into an MoE model in place, replacing its
  dense MLP blocks with :class:`~megamoe.layer.MoELayer` s. Built-in adapters cover Llama,
  Mistral, Qwen2 and GPT-2 (whose ``Conv1D`` weights are stored transposed); any other
  model works through an :class:`MLPAdapter` (a module-name pattern and a weight reader).
  With ``upcycle=True`` (default) every expert starts from the dense MLP's weights
  (optionally plus Gaussian noise), so with renormalised top-k weights and dropless routing
  the model's output equals the dense model's at step 0. A shared expert starts from the
  dense gate/up projections with a zero down projection (same step-0 output).
- :func:`swap_moe_blocks` replaces HF's own MoE blocks (Mixtral, Qwen2-MoE, GLM-4-MoE, DeepSeek-V3) with
  MoELayers holding the same weights and computing the same outputs, so existing MoE models
  train with megamoe's routers, dispatchers and balancers.
- The aux loss rides on each MoELayer's output (``attach_aux_loss``), so ``generate``, the
  HF ``Trainer`` and DeepSpeed need no change to the model's forward or loss;
  :class:`MoETrainerCallback` is the HF Trainer's adapter of the per-step state
  (``megamoe.train.step_state.MoEStepState``: the optimizer step, the gradient accumulation
  factor of the aux loss, load statistics and ALF-LB), and :class:`ThorTrainerMixin` trains
  with THOR's two-pass objective.
- :func:`load_moeified` reloads a ``save_pretrained`` directory of a moeified model: the
  moeify arguments are recorded in ``config.megamoe_moeify`` (``config.megamoe_swap`` for a
  model whose blocks :func:`swap_moe_blocks` replaced; it is reloaded by swapping again).
- ``save_pretrained`` of a moeified or swapped model keeps its own parameter names (so the HF
  ``Trainer`` resumes from it; transformers' own save-time renaming is turned off for it),
  but its ``config.json`` gets ``model_type`` :data:`MOEIFIED_MODEL_TYPE`
  (the base type moves to ``megamoe_base_model_type``): stock ``from_pretrained``, the
  Auto classes and tools built on them refuse it with a message naming ``load_moeified``
  and ``megamoe convert``, instead of silently building the dense model without its
  experts (or, for a swapped model, its MoE blocks randomly initialised). ``megamoe convert``
  (or :func:`megamoe.checkpoint.hf_convert.convert_to_hf`) writes the stock Mixtral /
  Qwen2-MoE / GLM-4-MoE class computing the same function; a swapped model is written as its
  own class.
"""
from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from megamoe.config import ConfigError, ExpertConfig, MoEConfig, RouterConfig, from_dict, to_dict
from megamoe.dispatch.base import Dispatcher
from megamoe.layer import MoELayer
from megamoe.routing.balancing import AuxFreeBalancingConfig
from megamoe.routing.topk import TopKOptions
from megamoe.stats import named_moe_layers
from megamoe.train.objectives import ConsistencyObjective
from megamoe.train.step_state import MoEStepState

LayerSpec = str | Sequence[int]
DispatcherFactory = Callable[[MoEConfig, int], Dispatcher]


@dataclass(frozen=True)
class DenseMLPWeights:
    """A dense MLP's weights in ``nn.Linear`` layout ([out, in]). ``gate_IH`` is None for
    non-gated MLPs; biases are None when the MLP has none."""

    up_IH: Tensor
    down_HI: Tensor
    gate_IH: Tensor | None = None
    up_bias_I: Tensor | None = None
    gate_bias_I: Tensor | None = None
    down_bias_H: Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.gate_IH is not None

    @property
    def has_bias(self) -> bool:
        return self.up_bias_I is not None


@dataclass(frozen=True)
class MLPAdapter:
    """How to find and read one model family's dense MLP blocks.

    mlp_pattern: regex matched (fullmatch) against ``model.named_modules()`` names; its
        first group is the block index (e.g. ``r"model\\.layers\\.(\\d+)\\.mlp"``).
    activation: maps the HF config to a megamoe activation (``swiglu`` ... see ExpertConfig).
    read: returns a block's :class:`DenseMLPWeights`.
    wrap: optional; builds the module put in the block's place from (old block, MoELayer),
        e.g. to keep a dropout the dense block applied after its output projection.
    """

    mlp_pattern: str
    activation: Callable[[Any], str]
    read: Callable[[nn.Module], DenseMLPWeights]
    wrap: Callable[[nn.Module, MoELayer], nn.Module] | None = None


def _act_from(mapping: dict[str, str], attr: str) -> Callable[[Any], str]:
    def pick(config: Any) -> str:
        name = getattr(config, attr, None)
        if name not in mapping:
            raise ConfigError(f"{type(config).__name__}.{attr}={name!r} has no megamoe expert activation; "
                              f"supported: {', '.join(map(repr, mapping))}")
        return mapping[name]
    return pick


def _read_gated(mlp: nn.Module) -> DenseMLPWeights:
    b = lambda lin: None if lin.bias is None else lin.bias.detach()  # noqa: E731
    return DenseMLPWeights(up_IH=mlp.up_proj.weight.detach(), down_HI=mlp.down_proj.weight.detach(),
                           gate_IH=mlp.gate_proj.weight.detach(), up_bias_I=b(mlp.up_proj),
                           gate_bias_I=b(mlp.gate_proj), down_bias_H=b(mlp.down_proj))


def _read_gpt2(mlp: nn.Module) -> DenseMLPWeights:
    # transformers' Conv1D computes x @ W + b with W [in, out]: the transpose of nn.Linear's.
    return DenseMLPWeights(up_IH=mlp.c_fc.weight.detach().t(), down_HI=mlp.c_proj.weight.detach().t(),
                           up_bias_I=mlp.c_fc.bias.detach(), down_bias_H=mlp.c_proj.bias.detach())


class DropoutAfter(nn.Module):
    """An MoE block followed by the dropout the dense block it replaces applied to its output."""

    def __init__(self, moe: MoELayer, dropout: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.moe(hidden_states))


_LLAMA_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_LLAMA = MLPAdapter(r"model\.layers\.(\d+)\.mlp", _act_from(_LLAMA_ACTS, "hidden_act"), _read_gated)
ADAPTERS: dict[str, MLPAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": MLPAdapter(r"transformer\.h\.(\d+)\.mlp",
                       _act_from({"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                                  "relu": "relu"}, "activation_function"),
                       _read_gpt2, wrap=lambda old, moe: DropoutAfter(moe, old.dropout)),
}


def adapter_for(model: nn.Module) -> MLPAdapter:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        raise ConfigError(f"no built-in MoE adapter for model_type={mt!r} (built-in: {', '.join(sorted(ADAPTERS))}); "
                          "pass adapter=MLPAdapter(mlp_pattern=..., activation=..., read=...)")
    return ADAPTERS[mt]


def _select(indices: list[int], layers: LayerSpec) -> list[int]:
    if isinstance(layers, str):
        if layers == "all":
            return indices
        if layers == "every_other":
            return [i for i in indices if i % 2 == 1]
        raise ConfigError(f"layers={layers!r} is invalid: use 'all', 'every_other' or a list of block indices")
    wanted = list(layers)
    bad = [i for i in wanted if i not in indices]
    if bad:
        raise ConfigError(f"layers={wanted!r} is invalid: blocks {bad} have no MLP matching the adapter "
                          f"(available: {indices})")
    return sorted(set(wanted))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _noisy(w: Tensor, noise: float, gen: torch.Generator | None) -> Tensor:
    if noise <= 0:
        return w
    n = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device)
    return w + (noise * w.float().std() * n).to(w.dtype)


@torch.no_grad()
def _upcycle(layer: MoELayer, dense: DenseMLPWeights, *, noise: float, gen: torch.Generator | None) -> None:
    ex = layer.experts
    first = torch.cat([dense.gate_IH, dense.up_IH]) if dense.gated else dense.up_IH
    first_b = None
    if dense.has_bias:
        first_b = torch.cat([dense.gate_bias_I, dense.up_bias_I]) if dense.gated else dense.up_bias_I
    offset = layer.dispatcher.local_expert_offset
    # Noise is drawn for every global expert in order, so each expert-parallel rank gets the
    # same initial experts as a single process would.
    for g in range(layer.config.num_experts):
        w_first, w_down = _noisy(first, noise, gen), _noisy(dense.down_HI, noise, gen)
        e = g - offset
        if not 0 <= e < ex.num_experts:
            continue
        ex.first_weight[e].copy_(w_first)
        ex.down_proj[e].copy_(w_down)
        if first_b is not None:
            ex.first_bias[e].copy_(first_b)
            ex.down_proj_bias[e].copy_(dense.down_bias_H)
    sh = layer.shared_expert
    if sh is not None:
        # Start from the dense features with a zero output projection: the step-0 output is
        # unchanged and the shared expert still receives gradients from step 0.
        reps = -(-sh.up_proj.weight.shape[0] // dense.up_IH.shape[0])
        tile = lambda w: w.repeat(reps, 1)[: sh.up_proj.weight.shape[0]]  # noqa: E731
        sh.up_proj.weight.copy_(tile(dense.up_IH))
        if sh.gated:
            sh.gate_proj.weight.copy_(tile(dense.gate_IH))
        sh.down_proj.weight.zero_()
        for lin in (getattr(sh, "gate_proj", None), sh.up_proj, sh.down_proj):
            if lin is not None and lin.bias is not None:
                lin.bias.zero_()
        if sh.gate is not None:
            sh.gate.weight.zero_()


def _place(layer: MoELayer, like: Tensor) -> MoELayer:
    layer.to(device=like.device)
    layer.experts.to(dtype=like.dtype)
    if layer.shared_expert is not None:
        layer.shared_expert.to(dtype=like.dtype)
    return layer


# ---------------------------------------------------------------------------------- save_pretrained
MOEIFIED_MODEL_TYPE = ("megamoe-moeified: load with megamoe.integrations.hf.load_moeified, or export to a stock "
                       "class with megamoe convert")
BASE_TYPE_KEY = "megamoe_base_model_type"


class _MoeifiedConfig:
    """Mixed into a moeified model's config class: ``config.json`` is written with
    :data:`MOEIFIED_MODEL_TYPE` (the live config keeps its model_type, so transformers'
    own code paths are unchanged)."""

    _moeified_base: type

    def to_json_string(self, use_diff: bool = True) -> str:
        data = json.loads(super().to_json_string(use_diff))  # type: ignore[misc]
        data[BASE_TYPE_KEY] = self._moeified_base.model_type
        data["model_type"] = MOEIFIED_MODEL_TYPE
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def __reduce__(self):
        return _restore_moeified_config, (self._moeified_base, dict(self.__dict__))


@functools.cache
def _moeified_config_class(base: type) -> type:
    return type(f"Moeified{base.__name__}", (_MoeifiedConfig, base), {"_moeified_base": base})


def _restore_moeified_config(base: type, state: dict) -> Any:
    cls = _moeified_config_class(base)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def is_moeified_config(config: Any) -> bool:
    """True for the config of a model :func:`moeify` converted."""
    return isinstance(config, _MoeifiedConfig)


def _mark_moeified(config: Any) -> None:
    if not isinstance(config, _MoeifiedConfig):
        config.__class__ = _moeified_config_class(type(config))


class _OwnLayoutSave:
    """Mixed into a moeified (or block-swapped) model's class, under the same class name:
    ``save_pretrained`` writes the parameters under the model's own names. transformers 5
    otherwise reverts its checkpoint conversions on save, and for a Mixtral those patterns
    match megamoe's layers too (``mlp.`` -> ``block_sparse_moe.``, the stacked experts split
    into per-expert ``w1/w2/w3``): the directory would then fit neither megamoe's layers nor
    the stock class. :func:`load_moeified` and the Trainer's resume read the names as saved."""

    _own_layout_base: type

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        if _save_reverts_conversions():
            kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(*args, **kwargs)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: int) -> Any:  # pickle finds the base class under this name
        return _restore_own_layout, (self._own_layout_base, self.__dict__)


@functools.cache
def _save_reverts_conversions() -> bool:
    import inspect

    import transformers

    return "save_original_format" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


@functools.cache
def _own_layout_class(base: type) -> type:
    # The same name: transformers looks classes up by name (architectures, conversion tables).
    return type(base.__name__, (_OwnLayoutSave, base), {"__module__": base.__module__,
                                                        "__qualname__": base.__qualname__, "_own_layout_base": base})


def _restore_own_layout(base: type, state: dict) -> Any:
    cls = _own_layout_class(base)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _save_own_layout(model: nn.Module) -> None:
    if hasattr(model, "save_pretrained") and not isinstance(model, _OwnLayoutSave):
        model.__class__ = _own_layout_class(type(model))


def read_moeified_config(path: str | Path) -> Any:
    """The base transformers config of a moeified ``save_pretrained`` directory (holding
    ``megamoe_moeify``); directories written before the model_type change load too."""
    import transformers

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a save_pretrained directory")
    data = json.loads(cfg_file.read_text())
    if data.get("model_type") == MOEIFIED_MODEL_TYPE:
        base = data.pop(BASE_TYPE_KEY, None)
        if base not in transformers.CONFIG_MAPPING:
            raise ConfigError(f"{cfg_file}: {BASE_TYPE_KEY}={base!r} is not a transformers model type")
        data["model_type"] = base
        return transformers.CONFIG_MAPPING[base].from_dict(data)
    return transformers.AutoConfig.from_pretrained(str(path))


def is_moeified_dir(path: str | Path) -> bool:
    """True for a ``save_pretrained`` directory of a moeified model."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        data = json.loads(cfg_file.read_text())
    except ValueError:
        return False
    return data.get("model_type") == MOEIFIED_MODEL_TYPE or bool(data.get("megamoe_moeify") or data.get("megamoe_swap"))


def moeify(model: nn.Module, *, num_experts: int, router: RouterConfig | None = None, layers: LayerSpec = "all",
           num_shared_experts: int = 0, shared_expert_gate: bool = False, upcycle: bool = True,
           upcycle_noise: float = 0.0, adapter: MLPAdapter | None = None, expert_impl: str = "auto",
           seed: int | None = None, dispatcher: DispatcherFactory | None = None) -> list[str]:
    """Replace ``model``'s dense MLP blocks by MoELayers, in place; returns the replaced names.

    num_experts: routed experts per MoE block. router: the RouterConfig (default: top-2
        softmax, renormalised). layers: ``"all"``, ``"every_other"`` (blocks 1, 3, ...) or
        a list of block indices. num_shared_experts / shared_expert_gate: as in MoEConfig
        (shared width = num_shared_experts * I). upcycle: copy the dense weights into every
        expert (else keep the fresh random init). upcycle_noise: add N(0, (noise *
        std(W))^2) to each copied weight matrix. adapter: how to find the MLPs (default:
        by ``model.config.model_type``). seed: seeds the router init and the noise.
        dispatcher: ``factory(moe_config, block_index) -> Dispatcher`` for expert
        parallelism (default: all experts local); each rank then holds its local experts.

    With a built-in adapter the arguments are recorded in ``model.config.megamoe_moeify``
    so :func:`load_moeified` can rebuild the model from a ``save_pretrained`` directory.
    ``save_pretrained`` then writes a config stock transformers refuses (module docstring).
    """
    if isinstance(upcycle_noise, bool) or not isinstance(upcycle_noise, (int, float)) or upcycle_noise < 0:
        raise ConfigError(f"upcycle_noise={upcycle_noise!r} is invalid: must be a number >= 0")
    router = router or RouterConfig()
    if not isinstance(router, RouterConfig):
        raise ConfigError(f"router={router!r} is invalid: pass a megamoe.RouterConfig")
    adapter = adapter or adapter_for(model)
    pattern = re.compile(adapter.mlp_pattern)
    found: dict[int, str] = {}
    for name, _ in model.named_modules():
        m = pattern.fullmatch(name)
        if m:
            found[int(m.group(1)) if m.groups() else len(found)] = name
    if not found:
        raise ConfigError(f"no module name matches the adapter's mlp_pattern {adapter.mlp_pattern!r}")
    chosen = _select(sorted(found), layers)
    activation = adapter.activation(model.config)
    if upcycle and (not getattr(router.options, "normalize_weights", True)
                    or getattr(router.options, "capacity_factor", None) is not None):
        warnings.warn("upcycled experts reproduce the dense MLP at step 0 only with router.options.normalize_weights"
                      "=True and dropless routing (capacity_factor=None)", stacklevel=2)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    replaced = []
    for idx in chosen:
        name = found[idx]
        old = model.get_submodule(name)
        dense = adapter.read(old)
        cfg = MoEConfig(hidden_size=dense.up_IH.shape[1], num_experts=num_experts,
                        experts=ExpertConfig(intermediate_size=dense.up_IH.shape[0], activation=activation,
                                             bias=dense.has_bias, impl=expert_impl),
                        router=router, num_shared_experts=num_shared_experts, shared_expert_gate=shared_expert_gate)
        if cfg.experts.gated != dense.gated:
            raise ConfigError(f"activation {activation!r} does not match block {name!r} "
                              f"({'gated' if dense.gated else 'not gated'})")
        if seed is not None:
            torch.manual_seed(seed + idx)
        layer = MoELayer(cfg, layer_index=idx, causal=True, dispatcher=dispatcher(cfg, idx) if dispatcher else None)
        if upcycle:
            _upcycle(layer, dense, noise=float(upcycle_noise), gen=gen)
        _place(layer, dense.up_IH)
        _set_module(model, name, adapter.wrap(old, layer) if adapter.wrap else layer)
        replaced.append(name)
    spec = dict(num_experts=num_experts, router=to_dict(router), layers=chosen,
                num_shared_experts=num_shared_experts, shared_expert_gate=shared_expert_gate, expert_impl=expert_impl)
    if adapter is ADAPTERS.get(getattr(model.config, "model_type", None)):
        model.config.megamoe_moeify = spec
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_json_string"):
        _mark_moeified(model.config)
    _save_own_layout(model)
    return replaced


# ---------------------------------------------------------------------------------- HF MoE blocks
def _router_for(config: Any, kind: str) -> RouterConfig:
    if kind in ("glm4_moe", "deepseek_v3"):
        if getattr(config, "n_group", 1) > 1 and config.topk_group < config.n_group:
            raise ConfigError(f"n_group={config.n_group}, topk_group={config.topk_group}: megamoe's top-k router "
                              "has no group-limited selection")
        return RouterConfig(top_k=config.num_experts_per_tok, aux_loss_coef=0.0,
                            options=TopKOptions(score_func="sigmoid", normalize_weights=bool(config.norm_topk_prob),
                                                routed_scaling_factor=float(config.routed_scaling_factor)))
    normalize = True if kind == "mixtral" else bool(config.norm_topk_prob)
    return RouterConfig(top_k=config.num_experts_per_tok, aux_loss_coef=float(config.router_aux_loss_coef),
                        options=TopKOptions(normalize_weights=normalize))


_HF_BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen2MoeSparseMoeBlock": "qwen2_moe", "Glm4MoeMoE": "glm4_moe",
              "DeepseekV3MoE": "deepseek_v3"}


@torch.no_grad()
def _layer_from_hf_block(block: nn.Module, kind: str, config: Any, index: int, router: RouterConfig | None,
                         dispatcher: DispatcherFactory | None) -> MoELayer:
    act = {"silu": "swiglu", "gelu": "geglu"}.get(config.hidden_act)
    if act is None:
        raise ConfigError(f"hidden_act={config.hidden_act!r}: megamoe gated experts support 'silu' and 'gelu'")
    gate_up = block.experts.gate_up_proj
    num_experts, two_i, hidden = gate_up.shape
    shared_kw: dict[str, Any] = {}
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None and shared.up_proj.weight.shape[0] > 0:
        shared_kw = dict(num_shared_experts=1, shared_intermediate_size=shared.up_proj.weight.shape[0],
                         shared_expert_gate=kind == "qwen2_moe")
    cfg = MoEConfig(hidden_size=hidden, num_experts=num_experts,
                    experts=ExpertConfig(intermediate_size=two_i // 2, activation=act),
                    router=router or _router_for(config, kind), **shared_kw)
    layer = MoELayer(cfg, layer_index=index, causal=True, dispatcher=dispatcher(cfg, index) if dispatcher else None)
    local = slice(layer.dispatcher.local_expert_offset,
                  layer.dispatcher.local_expert_offset + layer.dispatcher.num_local_experts)
    layer.router.weight.copy_(block.gate.weight)
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        layer.router.enable_selection_bias().copy_(bias)
    layer.experts.gate_up_proj.copy_(gate_up[local])
    layer.experts.down_proj.copy_(block.experts.down_proj[local])
    if shared_kw:
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.shared_expert, n).weight.copy_(getattr(shared, n).weight)
        if kind == "qwen2_moe":
            layer.shared_expert.gate.weight.copy_(block.shared_expert_gate.weight)
    return _place(layer, gate_up)


def swap_moe_blocks(model: nn.Module, *, router: RouterConfig | None = None,
                    dispatcher: DispatcherFactory | None = None) -> list[str]:
    """Replace HF Mixtral / Qwen2-MoE / GLM-4-MoE / DeepSeek-V3 MoE blocks by MoELayers with their weights,
    in place; returns the replaced module names. ``router`` overrides the equivalent
    RouterConfig (e.g. to change aux_loss_coef); the default reproduces HF's outputs.
    ``dispatcher``: as in :func:`moeify` (each rank keeps only its local experts' weights)."""
    config = model.config
    replaced = []
    for name, block in list(model.named_modules()):
        kind = _HF_BLOCKS.get(type(block).__name__)
        if kind is None:
            continue
        m = re.search(r"layers\.(\d+)\.", name + ".")
        layer = _layer_from_hf_block(block, kind, config, int(m.group(1)) if m else -1, router, dispatcher)
        _set_module(model, name, layer)
        replaced.append(name)
    if not replaced:
        raise ConfigError(f"no Mixtral/Qwen2-MoE/GLM-4-MoE/DeepSeek-V3 MoE block found in {type(model).__name__}")
    if getattr(config, "output_router_logits", False):
        # HF's own balance loss reads the removed router's logits; megamoe attaches its own.
        config.output_router_logits = False
    # Recorded like moeify's arguments: save_pretrained then writes a config stock loaders refuse
    # (they would build the HF blocks and leave them randomly initialised, the MoELayer weights
    # unread), load_moeified re-swaps, and megamoe convert writes the model's own stock class.
    config.megamoe_swap = {"router": to_dict(router) if router is not None else None}
    if hasattr(config, "to_json_string"):
        _mark_moeified(config)
    _save_own_layout(model)
    return replaced


# ---------------------------------------------------------------------------------- training, reload
def _trainer_callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class MoETrainerCallback(_trainer_callback_base()):
    """The HF Trainer's adapter of :class:`~megamoe.train.step_state.MoEStepState`.

    Each optimizer step begins with the Trainer's step number (router schedules read it) and
    ends (``on_step_end`` fires only at gradient-accumulation boundaries) with one all-reduce
    of the step's load, the ALF-LB update when balancing, and the load statistics, which are
    added to the Trainer's logs and ``state.log_history``. The aux loss is weighted by
    1/gradient_accumulation_steps: the Trainer averages the main loss over micro-batches and
    the aux loss joins once per micro-batch.

    Pass a ready ``step_state`` (build it before ``Trainer(...)`` when resuming a balanced run,
    so the bias buffers exist before the weights load), or ``balancing`` (an
    :class:`AuxFreeBalancingConfig`; the state is then built on the Trainer's model at
    ``on_train_begin``), or neither (no balancing).
    """

    def __init__(self, step_state: MoEStepState | None = None, *, balancing: AuxFreeBalancingConfig | None = None,
                 group: Any = None) -> None:
        if step_state is not None and not isinstance(step_state, MoEStepState):
            raise TypeError(f"MoETrainerCallback takes a MoEStepState, got {type(step_state).__name__}")
        if balancing is not None and not isinstance(balancing, AuxFreeBalancingConfig):
            raise TypeError(f"balancing must be an AuxFreeBalancingConfig, got {type(balancing).__name__}")
        self.step_state = step_state
        self._balancing = balancing
        self._group = group

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        resuming = state.global_step > 0
        if self.step_state is None:
            if resuming and self._balancing is not None:
                # The Trainer loaded the checkpoint before this hook, into a model without bias
                # buffers, so the saved biases were dropped; building now would restart at zero.
                raise RuntimeError(
                    "MoETrainerCallback: resuming a balanced run needs the biases to exist before the weights load; "
                    "build MoEStepState(model, balancing=...) before Trainer(...) and pass it as "
                    "MoETrainerCallback(step_state)")
            if model is None:
                raise RuntimeError("MoETrainerCallback: the Trainer passed no model to on_train_begin")
            self.step_state = MoEStepState(model, balancing=self._balancing, group=self._group)
        self.step_state.set_accumulation_steps(max(1, args.gradient_accumulation_steps))
        balancer = self.step_state.balancer
        if resuming and balancer is not None and balancer.num_updates == 0:
            # One update per optimizer step: the schedule continues where the run stopped.
            balancer.num_updates = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_state.begin_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.step_state.end_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer.log has already appended a copy of ``logs`` to log_history and shown it to
        # the callbacks registered before this one (reporting integrations come first), so
        # the metrics are added to both the live dict and that history entry.
        if logs is None or self.step_state is None or "loss" not in logs:
            return
        metrics = dict(self.step_state.last_metrics)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


class ThorTrainerMixin:
    """Mix into ``transformers.Trainer`` to train with THOR's two-pass objective
    (:class:`megamoe.train.objectives.ConsistencyObjective`)::

        class ThorTrainer(ThorTrainerMixin, Trainer):
            thor_alpha = 1.0
            thor_shift_labels = True   # causal LMs

    The labels are withheld from the model (so it does not compute its own loss) and the
    two-pass objective is returned instead.
    """

    thor_alpha: float = 1.0
    thor_shift_labels: bool = False
    thor_ignore_index: int = -100

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
        objective = ConsistencyObjective(alpha=self.thor_alpha, ignore_index=self.thor_ignore_index,
                                         shift_labels=self.thor_shift_labels)
        result = objective(model, inputs)
        if return_outputs:
            return result.loss, {"logits": result.logits1}
        return result.loss


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors (or index); save with save_pretrained()")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_moeified(path: str, *, dispatcher: DispatcherFactory | None = None, **from_config_kwargs: Any) -> nn.Module:
    """Reload a moeified (or block-swapped) model written by ``save_pretrained`` (its config
    holds ``megamoe_moeify`` or ``megamoe_swap``): builds the base model, re-applies moeify (or
    swap_moe_blocks), loads the weights."""
    p = Path(path)
    return build_moeified(read_moeified_config(p), _read_weights(p), dispatcher=dispatcher, where=str(p),
                          **from_config_kwargs)


def build_moeified(config: Any, state: dict[str, Tensor], *, dispatcher: DispatcherFactory | None = None,
                   where: str = "state", **from_config_kwargs: Any) -> nn.Module:
    """A moeified model from its config (holding ``megamoe_moeify`` or ``megamoe_swap``) and a
    state dict: the base skeleton, moeify without upcycling (or swap_moe_blocks), then the
    weights (eval mode)."""
    import copy

    import transformers

    spec = getattr(config, "megamoe_moeify", None)
    swap = getattr(config, "megamoe_swap", None)
    if not spec and swap is None:
        raise ConfigError(f"{where}/config.json has no 'megamoe_moeify' (or 'megamoe_swap') entry: it was not saved "
                          "from a model converted with megamoe.integrations.hf.moeify with a built-in adapter or with "
                          "swap_moe_blocks (with a custom adapter, build the model, call moeify(..., adapter=...) and "
                          "load_state_dict)")
    if isinstance(config, _MoeifiedConfig):  # the Auto classes know the base config class only
        config = copy.deepcopy(config)
        config.__class__ = config._moeified_base
    model = transformers.AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    if spec:
        spec = dict(spec)
        spec["router"] = from_dict(RouterConfig, spec["router"], where="megamoe_moeify.router")
        moeify(model, upcycle=False, dispatcher=dispatcher, **spec)
    else:
        router = swap.get("router") if isinstance(swap, dict) else None
        swap_moe_blocks(model, dispatcher=dispatcher,
                        router=from_dict(RouterConfig, router, where="megamoe_swap.router") if router else None)
    state = dict(state)
    for name, layer in named_moe_layers(model):
        if layer.dispatcher.num_local_experts != layer.config.num_experts:
            # An expert-parallel rank keeps its own slice of each stacked expert tensor.
            lo = layer.dispatcher.local_expert_offset
            for key in [k for k in state if k.startswith(f"{name}.experts.")]:
                state[key] = state[key][lo: lo + layer.dispatcher.num_local_experts]
    for name, mod in model.named_modules():
        if f"{name}.expert_bias" in state and hasattr(mod, "enable_selection_bias"):
            mod.enable_selection_bias()
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    # Tied weights (e.g. GPT-2's lm_head) are saved once; they are missing here by design.
    untied = [m for m in missing if not any(params.get(m) is params.get(k) for k in state if k in params)]
    if untied or unexpected:
        raise ValueError(f"{where}: weights do not match the moeified model: missing {untied[:6]}, "
                         f"unexpected {list(unexpected)[:6]}")
    return model.eval()


__all__ = ["ADAPTERS", "MOEIFIED_MODEL_TYPE", "DenseMLPWeights", "DropoutAfter", "MLPAdapter", "MoETrainerCallback",
           "ThorTrainerMixin", "adapter_for", "build_moeified", "is_moeified_config", "is_moeified_dir",
           "load_moeified", "moeify", "read_moeified_config", "swap_moe_blocks"]
