"""Expert MLPs with stacked weights, as Hugging Face transformers v5 names them.

Shape legend: R routed rows (token slots grouped by expert, expert 0 first), D hidden
size, I expert intermediate size, E experts held by this bank (the local experts).

Weights: gated activations (swiglu, geglu) use ``gate_up_proj`` [E, 2I, D] whose first I
rows are the gate and last I rows the up projection, and ``down_proj`` [E, D, I]; plain
activations use ``up_proj`` [E, I, D] and ``down_proj`` [E, D, I]. Optional biases are
``*_bias`` [E, out].

Paths, all computing the same function:
- ``triton``: ``torch._grouped_mm`` for both projections, the activation, the per-row
  combine weight and the first bias fused into one Triton kernel, the second bias added in
  one pass (``megamoe.kernels``; the dispatcher then also permutes and combines with Triton
  kernels). No host synchronisation for top-k routing, dropless or under a capacity
  (single process; see ``megamoe.dispatch.base.map_slots``).
- ``grouped``: one ``torch._grouped_mm`` per projection over the variable-size groups, the
  activation in plain torch ops.
- ``loop``: one GEMM per expert on its contiguous slice of rows.
- :func:`reference_moe`: a deliberately plain per-(token, slot) reference for tests.
``auto`` picks triton (grouped without triton installed) on CUDA when the shapes are
aligned, loop otherwise (on CPU the per-expert loop measured faster than grouped_mm in torch
2.13; see tools/bench/bench_layer.py). :meth:`ExpertBank.impl_for` is where that choice is made.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megamoe.activations import activation_fn
from megamoe.config import ExpertConfig, check_arg, require_config
from megamoe.kernels import available as _triton_available


class ExpertBank(nn.Module):
    """E expert MLPs stored as stacked weights (see module docstring)."""

    def __init__(self, config: ExpertConfig, *, hidden_size: int, num_experts: int) -> None:
        require_config("ExpertBank(config)", config, ExpertConfig)
        check_arg("ExpertBank", "hidden_size", hidden_size, int, ge=1)
        check_arg("ExpertBank", "num_experts", num_experts, int, ge=1)
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

    @torch.no_grad()
    def keep_experts(self, start: int, stop: int) -> None:
        """Keep only experts ``[start, stop)`` (an expert-parallel rank's slice; new parameters)."""
        if not 0 <= start < stop <= self.num_experts:
            raise ValueError(f"expert slice [{start}, {stop}) is invalid for {self.num_experts} experts")
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad))
        self.num_experts = stop - start

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
    def impl_for(self, x: Tensor) -> str:
        """The implementation that serves input ``x``: ``loop``, ``grouped`` or ``triton``.

        The one place ``ExpertConfig.impl='auto'`` is resolved (the dispatcher asks once per
        call): on CUDA with 16-byte aligned rows, ``triton`` when triton is installed, else
        ``grouped``; ``loop`` otherwise (on CPU the per-expert loop measured faster than
        grouped_mm). A forced impl the input cannot use raises ValueError / ImportError.
        """
        impl = self.config.impl
        aligned = self._grouped_ok(self.compute_dtype(x))
        if impl == "auto":
            if x.device.type != "cuda" or not aligned:
                return "loop"
            return "triton" if _triton_available() else "grouped"
        if impl in ("grouped", "triton") and not aligned:
            raise ValueError(
                f"ExpertConfig.impl={impl!r} needs float32/bfloat16/float16 tensors and hidden and "
                f"intermediate sizes whose rows are 16-byte aligned (got dtype {self.compute_dtype(x)}, "
                f"hidden {self.hidden_size}, intermediate {self.intermediate_size}); use impl='auto'")
        if impl == "triton" and not _triton_available():
            raise ImportError("ExpertConfig.impl='triton' needs the triton package: pip install 'megamoe[triton]' "
                              "(or use impl='auto', which falls back to 'grouped' / 'loop')")
        return impl

    def forward(self, x_RD: Tensor, tokens_per_expert_E: Tensor, row_weights_R: Tensor | None = None, *,
                impl: str | None = None) -> Tensor:
        """Apply expert e to its contiguous group of rows; groups are in expert order.

        tokens_per_expert_E: int64 [E] group sizes, summing to R.
        row_weights_R: the combine weight of each row (the experts own applying it; None:
            unweighted). It is applied on the MLP's narrow side: fused into the activation
            (``triton``), or on the hidden activation or the output, whichever is narrower.
        impl: the implementation resolved by :meth:`impl_for` (None: resolve it here).
        """
        if x_RD.shape[-1] != self.hidden_size:
            raise ValueError(f"expert input has hidden size {x_RD.shape[-1]}, expected {self.hidden_size}")
        impl = impl or self.impl_for(x_RD)
        if impl == "triton":
            return self._forward_triton(x_RD.to(self.compute_dtype(x_RD)), tokens_per_expert_E, row_weights_R)
        if impl == "grouped":
            y = self._forward_grouped(x_RD.to(self.compute_dtype(x_RD)), tokens_per_expert_E)
            return y if row_weights_R is None else y * row_weights_R.to(y.dtype).unsqueeze(1)
        return self._forward_loop(x_RD, tokens_per_expert_E, row_weights_R)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the grouped GEMMs run in: autocast's for float32 input under autocast
        (``torch._grouped_mm`` is not on autocast's cast list), else the input's. On CUDA only
        bfloat16 takes grouped_mm's fast path without a host synchronisation."""
        device = x.device.type
        if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return x.dtype

    def _grouped_ok(self, dtype: torch.dtype) -> bool:
        if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return all((n * dtype.itemsize) % 16 == 0 for n in (self.hidden_size, self.intermediate_size))

    def _forward_loop(self, x_RD: Tensor, tokens_per_expert_E: Tensor, row_weights_R: Tensor | None) -> Tensor:
        sizes = tokens_per_expert_E.tolist()
        return _SegmentMLP.apply(x_RD, None, sizes, self._hidden, self.config.activation, self.first_weight,
                                 self.first_bias, self.down_proj, self.down_proj_bias, row_weights_R)

    def forward_tokens(self, x_TD: Tensor, token_idx_R: Tensor, tokens_per_expert_E: Tensor,
                       row_weights_R: Tensor) -> Tensor:
        """Fused gather, experts and weighted combine on one process (the CPU ``loop`` path):
        out_t = sum over rows r with token_idx_R[r] == t of row_weights_R[r] * expert(x_t),
        rows grouped by expert (tokens_per_expert_E sizes), accumulated in row order."""
        if x_TD.shape[-1] != self.hidden_size:
            raise ValueError(f"expert input has hidden size {x_TD.shape[-1]}, expected {self.hidden_size}")
        sizes = tokens_per_expert_E.tolist()
        return _SegmentMLP.apply(x_TD, token_idx_R, sizes, self._hidden, self.config.activation, self.first_weight,
                                 self.first_bias, self.down_proj, self.down_proj_bias, row_weights_R)

    def _forward_grouped(self, x_RD: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        offs = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        h = torch._grouped_mm(x_RD, self.first_weight.to(x_RD.dtype).transpose(-2, -1), offs=offs)
        if self.first_bias is not None:
            h = h + self._row_bias(self.first_bias, tokens_per_expert_E, x_RD.shape[0])
        a = self._hidden(h)
        y = torch._grouped_mm(a, self.down_proj.to(a.dtype).transpose(-2, -1), offs=offs)
        if self.down_proj_bias is not None:
            y = y + self._row_bias(self.down_proj_bias, tokens_per_expert_E, x_RD.shape[0])
        return y

    def _forward_triton(self, x_RD: Tensor, tokens_per_expert_E: Tensor, row_weights_R: Tensor | None) -> Tensor:
        """grouped_mm -> fused weighted activation kernel -> grouped_mm. Saved for backward:
        the GEMM inputs x_RD and a_RI, and the pre-activation h (the activation kernel
        recomputes act(h) in its backward). Biases are added inside the kernels (the first on
        the activation's load, the second, weighted, in one pass over the output rows): no
        [R, width] bias rows are built. No host synchronisation."""
        from megamoe.kernels.activation import expert_act
        from megamoe.kernels.bias import row_bias

        num_rows = x_RD.shape[0]
        offs = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        expert_of_row = None
        if self.first_bias is not None or self.down_proj_bias is not None:
            expert_of_row = torch.arange(self.num_experts, device=x_RD.device).repeat_interleave(
                tokens_per_expert_E, output_size=num_rows)
        h = torch._grouped_mm(x_RD, self.first_weight.to(x_RD.dtype).transpose(-2, -1), offs=offs)
        a = expert_act(h, row_weights_R, self.config.activation, self.first_bias, expert_of_row,
                       None if self.first_bias is None else offs)
        y = torch._grouped_mm(a, self.down_proj.to(a.dtype).transpose(-2, -1), offs=offs)
        if self.down_proj_bias is not None:
            # The bias is part of each expert's output, so the row weight scales it too.
            y = row_bias(y, self.down_proj_bias, expert_of_row, offs, row_weights_R)
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
    """The loop path as one autograd node: one GEMM per expert on its contiguous group of
    rows, everything else (activation, combine weights, biases, gradients) done one expert
    segment at a time, so no temporary larger than one segment is created beyond the
    saved pre-activation. Avoids per-expert split/cat and autograd bookkeeping, which
    dominate for many small experts on CPU. Experts with no rows get exact zero gradients
    (every parameter always receives a gradient).

    Two layouts:
    - ``token_idx_R is None``: input rows x_RD are already grouped by expert; the output is
      y_RD in the same row order.
    - ``token_idx_R`` given (single-process fast path): x is x_TD; the rows of each segment
      are gathered from it (x[token_idx_R[s:t]]) and the weighted outputs scatter-added
      back to out_TD in row order (CPU index_add_: deterministic). Neither the permuted
      input nor the per-row output [R, D] (nor their gradients) is ever materialised.

    Memory: only the pre-activation h [R, I'] and the row weights are saved (plus x, which
    the caller holds anyway); the activation is recomputed per segment in backward.
    With row weights w_R the output is w_r * (expert(x_r)); the forward applies them on
    the narrower side (hidden activation before the linear down projection, or the output).
    """

    @staticmethod
    def forward(ctx, x, token_idx_R, sizes, hidden_fn, act, w1, b1, w2, b2, w_R):  # type: ignore[override]
        num_rows = sum(sizes)
        dim = w2.shape[1]
        h = x.new_empty(num_rows, w1.shape[1])
        scatter = token_idx_R is not None
        out = x.new_zeros(x.shape[0], dim) if scatter else x.new_empty(num_rows, dim)
        # Scale whichever side is narrower (same function: the projection is linear).
        scale_output = w2.shape[1] < w2.shape[2]
        for e, s, t in _segments(sizes):
            x_seg = x.index_select(0, token_idx_R[s:t]) if scatter else x[s:t]
            h_seg = h[s:t]
            if b1 is None:
                torch.mm(x_seg, w1[e].t(), out=h_seg)
            else:
                torch.addmm(b1[e], x_seg, w1[e].t(), out=h_seg)
            del x_seg
            a_seg = hidden_fn(h_seg)
            w_seg = None if w_R is None else w_R[s:t].to(a_seg.dtype).unsqueeze(1)
            if w_seg is not None and not scale_output:
                a_seg.mul_(w_seg)
            y_seg = x.new_empty(t - s, dim) if scatter else out[s:t]
            torch.mm(a_seg, w2[e].t(), out=y_seg)
            del a_seg
            if w_seg is not None and scale_output:
                if b2 is not None:
                    y_seg.add_(b2[e])
                y_seg.mul_(w_seg)
            elif b2 is not None:
                if w_seg is None:
                    y_seg.add_(b2[e])
                else:
                    y_seg.addcmul_(w_seg, b2[e])
            if scatter:
                out.index_add_(0, token_idx_R[s:t], y_seg)
        ctx.save_for_backward(x, token_idx_R, h, w1, w2, w_R, b2)
        ctx.sizes, ctx.hidden_fn, ctx.act = sizes, hidden_fn, act
        ctx.has_b1 = b1 is not None
        return out

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        x, token_idx_R, h, w1, w2, w_R, b2 = ctx.saved_tensors
        sizes = ctx.sizes
        num_experts = len(sizes)
        scatter = token_idx_R is not None
        g_out = g_out.contiguous()
        g_x = torch.zeros_like(x) if scatter else torch.empty_like(x)
        g_w1, g_w2 = _grad_buffer(w1, sizes), _grad_buffer(w2, sizes)
        g_b1 = h.new_zeros(num_experts, h.shape[1]) if ctx.has_b1 else None
        g_b2 = None if b2 is None else b2.new_zeros(b2.shape)
        g_w_R = None if w_R is None else torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        narrow_out = w2.shape[1] < w2.shape[2]
        for e, s, t in _segments(sizes):
            idx = token_idx_R[s:t] if scatter else None
            g_y = g_out.index_select(0, idx) if scatter else g_out[s:t]
            a, act_backward = _act_forward(ctx.act, ctx.hidden_fn, h[s:t])
            w_seg = None if w_R is None else w_R[s:t].to(a.dtype).unsqueeze(1)
            m = torch.mm(g_y, w2[e])  # d loss / d a, before the row weight
            if w_seg is None:
                torch.mm(g_y.t(), a, out=g_w2[e])
                if g_b2 is not None:
                    g_b2[e] = g_y.sum(0)
            else:
                g_w_R[s:t] = (m * a).sum(1)
                if b2 is not None:
                    g_w_R[s:t] += g_y @ b2[e]
                # d/dW2 = (w * g_y)^T a: scale the narrower operand.
                if narrow_out:
                    torch.mm((g_y * w_seg).t(), a, out=g_w2[e])
                else:
                    torch.mm(g_y.t(), a * w_seg, out=g_w2[e])
                if g_b2 is not None:
                    g_b2[e] = (w_seg.t() @ g_y)[0]
                m.mul_(w_seg)
            del a, g_y
            g_h = act_backward(m)
            del m, act_backward
            x_seg = x.index_select(0, idx) if scatter else x[s:t]
            torch.mm(g_h.t(), x_seg, out=g_w1[e])
            if g_b1 is not None:
                g_b1[e] = g_h.sum(0)
            if scatter:
                g_x.index_add_(0, idx, torch.mm(g_h, w1[e]))
            else:
                torch.mm(g_h, w1[e], out=g_x[s:t])
            del g_h, x_seg
        if not scatter and sum(sizes) < x.shape[0]:
            g_x[sum(sizes):].zero_()
        if g_w_R is not None:
            g_w_R = g_w_R.to(w_R.dtype)
        return g_x, None, None, None, None, g_w1, g_b1, g_w2, g_b2, g_w_R


def _act_forward(act: str, hidden_fn, h_seg: Tensor):
    """Activation of one segment and a closure mapping d/d(activation) to d/d(h_seg)."""
    if act == "swiglu":
        gate, up = h_seg.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        a = silu * up

        def backward(g_a: Tensor) -> Tensor:
            g_h = torch.empty_like(h_seg)
            g_gate, g_up = g_h.chunk(2, dim=-1)
            torch.mul(g_a, silu, out=g_up)
            # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
            torch.mul(g_a, up, out=g_gate)
            g_gate.mul_(silu.mul_(sig.neg().add_(1)).add_(sig))
            return g_h
        return a, backward
    with torch.enable_grad():
        h_ = h_seg.detach().requires_grad_(True)
        a_ = hidden_fn(h_)

    def backward_generic(g_a: Tensor) -> Tensor:
        (g_h,) = torch.autograd.grad(a_, h_, g_a)
        return g_h
    return a_.detach(), backward_generic


def _grad_buffer(w_E: Tensor, sizes: list[int]) -> Tensor:
    """Gradient buffer for stacked weights: every expert with rows is overwritten by its
    GEMM, so only experts without rows need zeroing."""
    buf = torch.empty_like(w_E)
    for e, n in enumerate(sizes):
        if n == 0:
            buf[e].zero_()
    return buf


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
