"""Expert MLPs with stacked weights, as Hugging Face transformers v5 names them.

Shape legend: R routed rows (token slots grouped by expert, expert 0 first), D hidden
size, I expert intermediate size, E experts held by this bank (the local experts).

Weights: gated activations (swiglu, geglu) use ``gate_up_proj`` [E, 2I, D] whose first I
rows are the gate and last I rows the up projection, and ``down_proj`` [E, D, I]; plain
activations use ``up_proj`` [E, I, D] and ``down_proj`` [E, D, I]. Optional biases are
``*_bias`` [E, out].

Paths, all computing the same function:
- ``grouped``: one ``torch._grouped_mm`` per projection over the variable-size groups.
- ``loop``: one GEMM per expert on its contiguous slice of rows.
- :func:`reference_moe`: a deliberately plain per-(token, slot) reference for tests.
``auto`` picks grouped on CUDA when the shapes are aligned, loop otherwise (on CPU the
per-expert loop measured faster than grouped_mm in torch 2.13; see tools/bench_layer.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe.config import ExpertConfig


def activation_fn(name: str):
    if name in ("swiglu", "relu"):
        return F.silu if name == "swiglu" else F.relu
    if name in ("geglu", "gelu"):
        return F.gelu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


class ExpertBank(nn.Module):
    """E expert MLPs stored as stacked weights (see module docstring)."""

    def __init__(self, config: ExpertConfig, *, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.intermediate_size = config.intermediate_size
        self.gated = config.gated
        self.act = activation_fn(config.activation)
        inter, hid = config.intermediate_size, hidden_size
        first = "gate_up_proj" if self.gated else "up_proj"
        self.first_name = first
        self.register_parameter(first, nn.Parameter(torch.empty(num_experts, (2 if self.gated else 1) * inter, hid)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hid, inter))
        if config.bias:
            self.register_parameter(first + "_bias", nn.Parameter(torch.zeros(num_experts, self.first_weight.shape[1])))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hid))
        else:
            self.register_parameter(first + "_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    @property
    def first_weight(self) -> Tensor:
        return getattr(self, self.first_name)

    @property
    def first_bias(self) -> Tensor | None:
        return getattr(self, self.first_name + "_bias")

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w in (self.first_weight, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        for b in (self.first_bias, self.down_proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.config.activation!r}, "
                f"impl={self.config.impl!r}")

    # ------------------------------------------------------------------ per-expert math
    def _hidden(self, h: Tensor) -> Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def expert_forward(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert ``e`` applied to rows ``x_ND`` (any N)."""
        return self._mlp(x_ND, *(None if t is None else t[e] for t in self._weights()))

    def _weights(self) -> tuple[Tensor | None, ...]:
        return self.first_weight, self.first_bias, self.down_proj, self.down_proj_bias

    def _mlp(self, x_ND: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        return F.linear(self._hidden(F.linear(x_ND, w1, b1)), w2, b2)

    def _per_expert(self) -> list[tuple[Tensor | None, ...]]:
        # unbind once: indexing weight[e] per expert would make each backward materialise a
        # full [E, ...] zero gradient (O(E^2) memory traffic); unbind's backward stacks once.
        parts = [t.unbind(0) if t is not None else (None,) * self.num_experts for t in self._weights()]
        return list(zip(*parts))

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: y_ETD (used by competition routing)."""
        return torch.stack([self._mlp(x_TD, *w) for w in self._per_expert()])

    # ------------------------------------------------------------------ grouped rows
    def forward(self, x_RD: Tensor, tokens_per_expert_E: Tensor, row_weights_R: Tensor | None = None) -> Tensor:
        """Apply expert e to its contiguous group of rows; groups are in expert order.

        tokens_per_expert_E: int64 [E] group sizes, summing to R.
        row_weights_R: optional combine weight per row; the output rows are then scaled by
            it (applied inside the MLP on its narrower side, which saves memory traffic).
        """
        if x_RD.shape[-1] != self.hidden_size:
            raise ValueError(f"expert input has hidden size {x_RD.shape[-1]}, expected {self.hidden_size}")
        impl = self.config.impl
        if impl == "auto":
            impl = "grouped" if self._grouped_ok(x_RD) else "loop"
        elif impl == "grouped" and not self._grouped_ok(x_RD):
            raise ValueError(
                "ExpertConfig.impl='grouped' needs float32/bfloat16/float16 tensors and hidden and "
                f"intermediate sizes whose rows are 16-byte aligned (got dtype {x_RD.dtype}, "
                f"hidden {self.hidden_size}, intermediate {self.intermediate_size}); use impl='auto'")
        if impl == "grouped":
            y = self._forward_grouped(x_RD, tokens_per_expert_E)
            return y if row_weights_R is None else y * row_weights_R.to(y.dtype).unsqueeze(1)
        return self._forward_loop(x_RD, tokens_per_expert_E, row_weights_R)

    def _grouped_ok(self, x: Tensor) -> bool:
        if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if self.config.impl == "auto" and x.device.type != "cuda":
            return False
        elem = x.element_size()
        return all((n * elem) % 16 == 0 for n in (self.hidden_size, self.intermediate_size))

    def _forward_loop(self, x_RD: Tensor, tokens_per_expert_E: Tensor, row_weights_R: Tensor | None) -> Tensor:
        sizes = tokens_per_expert_E.tolist()
        return _SegmentMLP.apply(x_RD, sizes, self._hidden, self.first_weight, self.first_bias, self.down_proj,
                                 self.down_proj_bias, row_weights_R)

    def _forward_grouped(self, x_RD: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        offs = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        h = torch._grouped_mm(x_RD, self.first_weight.to(x_RD.dtype).transpose(-2, -1), offs=offs)
        if self.first_bias is not None:
            h = h + self._row_bias(self.first_bias, tokens_per_expert_E, x_RD.shape[0])
        a = self._hidden(h)
        y = torch._grouped_mm(a, self.down_proj.to(a.dtype).transpose(-2, -1), offs=offs)
        if self.down_proj_bias is not None:
            y = y + self._row_bias(self.down_proj_bias, tokens_per_expert_E, x_RD.shape[0])
        return y

    @staticmethod
    def _row_bias(bias_EO: Tensor, tokens_per_expert_E: Tensor, num_rows: int) -> Tensor:
        return bias_EO.repeat_interleave(tokens_per_expert_E, dim=0, output_size=num_rows)


def _segments(sizes: list[int]):
    start = 0
    for e, n in enumerate(sizes):
        if n > 0:
            yield e, start, start + n
        start += n


class _SegmentMLP(torch.autograd.Function):
    """The loop path as one autograd node: per-expert GEMMs write into preallocated row
    slices, the activation runs once over all rows, and the backward computes weight
    gradients directly into stacked [E, ...] tensors. Avoids per-expert split/cat and
    autograd bookkeeping, which dominate for many small experts on CPU. Experts with no
    rows get exact zero gradients (every parameter always receives a gradient).

    Memory: only x, the pre-activation h and the row weights are saved; the activation is
    recomputed in backward (it is recomputed there for its own gradient anyway).
    With row weights w_R the output is y_r * w_r. The forward applies them on the narrower
    side (hidden activation before the linear down projection, or the output in place);
    the backward is the same for both and needs no output-sized saved tensor.
    """

    @staticmethod
    def forward(ctx, x_RD, sizes, hidden_fn, w1, b1, w2, b2, w_R):  # type: ignore[override]
        num_rows = x_RD.shape[0]
        sizes_t = torch.tensor(sizes, device=x_RD.device)
        h = x_RD.new_empty(num_rows, w1.shape[1])
        for e, s, t in _segments(sizes):
            torch.mm(x_RD[s:t], w1[e].t(), out=h[s:t])
        if b1 is not None:
            h += b1.repeat_interleave(sizes_t, dim=0, output_size=num_rows)
        a = hidden_fn(h)
        w_col = None if w_R is None else w_R.to(a.dtype).unsqueeze(1)
        # Forward: scale whichever side is narrower (same function: the projection is linear).
        scale_output = w_col is not None and w2.shape[1] < w2.shape[2]
        if w_col is not None and not scale_output:
            a = a * w_col
        y = x_RD.new_empty(num_rows, w2.shape[1])
        for e, s, t in _segments(sizes):
            torch.mm(a[s:t], w2[e].t(), out=y[s:t])
        del a
        if b2 is not None:
            b2_rows = b2.repeat_interleave(sizes_t, dim=0, output_size=num_rows)
            y += b2_rows if scale_output or w_col is None else b2_rows * w_col
        if scale_output:
            y.mul_(w_col)
        ctx.save_for_backward(x_RD, h, w1, w2, w_R, b2)
        ctx.sizes, ctx.hidden_fn, ctx.has_bias = sizes, hidden_fn, (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, g_y):  # type: ignore[override]
        x_RD, h, w1, w2, w_R, b2 = ctx.saved_tensors
        sizes = ctx.sizes
        g_y = g_y.contiguous()
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            a_ = ctx.hidden_fn(h_)
        a = a_.detach()
        w_col = None if w_R is None else w_R.to(a.dtype).unsqueeze(1)
        a_in = a * w_col if w_col is not None else a
        g_a_in = torch.empty_like(a)
        g_w2 = _grad_buffer(w2, sizes)
        for e, s, t in _segments(sizes):
            torch.mm(g_y[s:t], w2[e], out=g_a_in[s:t])
            torch.mm(g_y[s:t].t(), a_in[s:t], out=g_w2[e])
        del a_in
        g_b2 = g_w_R = None
        if ctx.has_bias[1]:
            g_b2 = _segment_sums(g_y * w_col if w_col is not None else g_y, sizes, len(sizes))
        if w_col is not None:
            g_w_R = (g_a_in * a).sum(1)
            if b2 is not None:
                b2_rows = b2.repeat_interleave(torch.tensor(sizes, device=b2.device), dim=0,
                                               output_size=x_RD.shape[0])
                g_w_R = g_w_R + (g_y * b2_rows).sum(1)
            g_a = g_a_in.mul_(w_col)
        else:
            g_a = g_a_in
        del a
        (g_h,) = torch.autograd.grad(a_, h_, g_a)
        del a_, h_, g_a, g_a_in
        g_x = torch.empty_like(x_RD)
        g_w1 = _grad_buffer(w1, sizes)
        for e, s, t in _segments(sizes):
            torch.mm(g_h[s:t], w1[e], out=g_x[s:t])
            torch.mm(g_h[s:t].t(), x_RD[s:t], out=g_w1[e])
        g_b1 = _segment_sums(g_h, sizes, len(sizes)) if ctx.has_bias[0] else None
        if g_w_R is not None:
            g_w_R = g_w_R.to(w_R.dtype)
        return g_x, None, None, g_w1, g_b1, g_w2, g_b2, g_w_R


def _grad_buffer(w_E: Tensor, sizes: list[int]) -> Tensor:
    """Gradient buffer for stacked weights: every expert with rows is overwritten by its
    GEMM, so only experts without rows need zeroing."""
    buf = torch.empty_like(w_E)
    for e, n in enumerate(sizes):
        if n == 0:
            buf[e].zero_()
    return buf


def _segment_sums(g_RO: Tensor, sizes: list[int], num_experts: int) -> Tensor:
    out = g_RO.new_zeros(num_experts, g_RO.shape[1])
    for e, s, t in _segments(sizes):
        out[e] = g_RO[s:t].sum(0)
    return out


def reference_moe(experts: ExpertBank, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """Plain reference: out_t = sum_k w_tk * expert_{e_tk}(x_t), skipping slots with id -1.

    Written for clarity, not speed; the ground truth for the fast paths in tests.
    """
    out = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for k in range(expert_ids_TK.shape[1]):
        for e in range(experts.num_experts):
            rows = (expert_ids_TK[:, k] == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            y = experts.expert_forward(x_TD[rows], e).float()
            out = out.index_add(0, rows, weights_TK[rows, k, None].float() * y)
    return out.to(x_TD.dtype)
