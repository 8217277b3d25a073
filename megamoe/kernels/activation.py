"""The expert activation with the combine weight fused in, as a torch custom op.

Shape legend: R routed rows, I expert intermediate size.

Forward: ``a_RI = act(h) * w_R`` for plain activations (GELU, GELU-tanh, ReLU; ``h`` is
[R, I]) and ``a_RI = act(gate) * up * w_R`` for gated ones (SwiGLU: silu gate, GeGLU: GELU
gate), where ``h`` is the [R, 2I] output of the first projection, gate = its first I
columns and up = its last I, read in place (no strided ``chunk`` copies). ``w_R`` is each
row's combine weight (None: unweighted, as when every expert runs on every token); applying
it here, on the narrow [R, I] side, is free, and the down projection is linear, so the
expert's output rows come out already weighted.

Optional first-projection bias ``b_EX`` [E, (2)I]: row r (of expert ``expert_of_row_R[r]``)
adds its expert's bias to ``h`` on load, in fp32, instead of a [R, (2)I] bias tensor being
built and added before the kernel.

Backward: only ``h`` (and ``w_R``) is saved; the activation is recomputed from ``h`` in the
same pass that produces ``g_h`` [R, (2)I] and ``g_w_R = sum_i g_a * act(gate) * up``, one
program per block of rows walking the columns (a fixed-order row reduction: no atomics).
The bias gradient is each expert's column sum of ``g_h`` (``megamoe.kernels.bias``).
All math in fp32, rounded once on store.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from megamoe.activations import activation_fn
from megamoe.config import GATED_ACTIVATIONS
from megamoe.kernels.launch import Tile, check_device, is_interpreted, row_tile

# activation name -> (kernel kind: the function _act_and_grad computes, gated)
ACTIVATIONS = {name: (kind, name in GATED_ACTIVATIONS)
               for name, kind in {"swiglu": 0, "geglu": 1, "gelu": 1, "gelu_tanh": 2, "relu": 3}.items()}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _act_and_grad(x, KIND: tl.constexpr):
    """f(x) and f'(x) in fp32. KIND: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu."""
    if KIND == 0:
        s = tl.sigmoid(x)
        f = x * s
        df = s + f * (1.0 - s)
    elif KIND == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        f = x * cdf
        df = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif KIND == 2:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u)
        f = 0.5 * x * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        f = tl.maximum(x, 0.0)
        df = (x > 0.0).to(tl.float32)
    return f, df


@triton.jit
def _load_pre(h_row, b_row, mask, HAS_B: tl.constexpr):
    """Pre-activation in fp32: h, plus the row's expert bias when there is one."""
    v = tl.load(h_row, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        v += tl.load(b_row, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _bias_rows(b_ptr, e_ptr, rows, row_ok, cols, b_stride, HAS_B: tl.constexpr):
    """Pointers to the bias entries of each row's expert (``b_ptr`` itself without a bias)."""
    # One return per compiled variant: compiled Triton rejects a function whose returns
    # differ in type (a [rows, cols] pointer block here, one pointer there) even when a
    # constexpr branch makes one of them unreachable; the interpreter does not check.
    if HAS_B:
        experts = tl.load(e_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        ptrs = b_ptr + experts[:, None] * b_stride + cols[None, :]
    else:
        ptrs = b_ptr
    return ptrs


@triton.jit
def _act_fwd_kernel(h_ptr, w_ptr, b_ptr, e_ptr, out_ptr, num_rows, inter, h_stride, b_stride, out_stride,
                    KIND: tl.constexpr, GATED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < inter)[None, :]
    h_row = h_ptr + rows.to(tl.int64)[:, None] * h_stride + cols[None, :]
    b_row = _bias_rows(b_ptr, e_ptr, rows, row_ok, cols, b_stride, HAS_B)
    f, _ = _act_and_grad(_load_pre(h_row, b_row, mask, HAS_B), KIND)
    if GATED:
        f = f * _load_pre(h_row + inter, b_row + inter, mask, HAS_B)
    if HAS_W:
        f = f * tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], f.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _act_bwd_kernel(g_ptr, h_ptr, w_ptr, b_ptr, e_ptr, gh_ptr, gw_ptr, num_rows, inter, g_stride, h_stride, b_stride,
                    KIND: tl.constexpr, GATED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)[:, None]
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    gw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < inter)[None, :]
        g = tl.load(g_ptr + rows64 * g_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_row = h_ptr + rows64 * h_stride + cols[None, :]
        gh_row = gh_ptr + rows64 * h_stride + cols[None, :]
        b_row = _bias_rows(b_ptr, e_ptr, rows, row_ok, cols, b_stride, HAS_B)
        f, df = _act_and_grad(_load_pre(h_row, b_row, mask, HAS_B), KIND)
        g_eff = g  # d loss / d (unweighted activation)
        if HAS_W:
            g_eff = g * w
        if GATED:
            up = _load_pre(h_row + inter, b_row + inter, mask, HAS_B)
            tl.store(gh_row, (g_eff * up * df).to(gh_ptr.dtype.element_ty), mask=mask)
            tl.store(gh_row + inter, (g_eff * f).to(gh_ptr.dtype.element_ty), mask=mask)
            unweighted = f * up
        else:
            tl.store(gh_row, (g_eff * df).to(gh_ptr.dtype.element_ty), mask=mask)
            unweighted = f
        if HAS_W:
            gw += tl.sum(g * unweighted, axis=1)
    if HAS_W:
        tl.store(gw_ptr + rows, gw.to(gw_ptr.dtype.element_ty), mask=row_ok)


def _kind(activation: str) -> tuple[int, bool]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"no fused kernel for activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _inter(h: Tensor, gated: bool) -> int:
    if gated and h.shape[1] % 2:
        raise ValueError(f"a gated activation needs an even pre-activation width [R, 2I], got {tuple(h.shape)}")
    return h.shape[1] // 2 if gated else h.shape[1]


def _bias_args(h_RX: Tensor, bias: Tensor | None, expert_of_row: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """(bias, expert_of_row, bias row stride) kernel arguments; placeholders without a bias."""
    if bias is None:
        return h_RX, h_RX, 0
    if expert_of_row is None or bias.dim() != 2 or bias.shape[1] != h_RX.shape[1] or \
            expert_of_row.shape != h_RX.shape[:1]:
        raise ValueError(f"activation bias: pre-activation {tuple(h_RX.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} and expert_of_row "
                         f"{None if expert_of_row is None else tuple(expert_of_row.shape)} do not fit "
                         "(want [R, X], [E, X], [R])")
    bias = bias.contiguous()
    return bias, expert_of_row.contiguous(), bias.stride(0)


def act_forward(h_RX: Tensor, w_R: Tensor | None, activation: str, *, bias: Tensor | None = None,
                expert_of_row: Tensor | None = None, tile: Tile | None = None) -> Tensor:
    """``act(h + b) [* up] * w`` (the raw kernel launch, no autograd); X is 2I (gated) or I."""
    kind, gated = _kind(activation)
    check_device(_act_fwd_kernel, h_RX, *(t for t in (w_R, bias, expert_of_row) if t is not None))
    h_RX = h_RX.contiguous()
    num_rows, inter = h_RX.shape[0], _inter(h_RX, gated)
    b, e, b_stride = _bias_args(h_RX, bias, expert_of_row)
    out = h_RX.new_empty(num_rows, inter)
    if num_rows == 0 or inter == 0:
        return out
    tile = tile or row_tile(inter, interpreted=is_interpreted(_act_fwd_kernel))
    grid = (triton.cdiv(num_rows, tile.block_rows), triton.cdiv(inter, tile.block_cols))
    _act_fwd_kernel[grid](h_RX, h_RX if w_R is None else w_R.contiguous(), b, e, out, num_rows, inter, h_RX.stride(0),
                          b_stride, out.stride(0), KIND=kind, GATED=gated, HAS_W=w_R is not None,
                          HAS_B=bias is not None, BLOCK_R=tile.block_rows, BLOCK_C=tile.block_cols,
                          num_warps=tile.num_warps)
    return out


def act_backward(g_RI: Tensor, h_RX: Tensor, w_R: Tensor | None, activation: str, *, bias: Tensor | None = None,
                 expert_of_row: Tensor | None = None, tile: Tile | None = None) -> tuple[Tensor, Tensor]:
    """(g_h, g_w) for :func:`act_forward`; g_w is empty when ``w_R`` is None. ``g_h`` is also
    the gradient of the bias rows (the bias gradient is its per-expert column sum)."""
    kind, gated = _kind(activation)
    check_device(_act_bwd_kernel, g_RI, h_RX, *(t for t in (w_R, bias, expert_of_row) if t is not None))
    g_RI, h_RX = g_RI.contiguous(), h_RX.contiguous()
    num_rows, inter = h_RX.shape[0], _inter(h_RX, gated)
    b, e, b_stride = _bias_args(h_RX, bias, expert_of_row)
    g_h = torch.empty_like(h_RX)
    g_w = torch.empty(0 if w_R is None else num_rows, dtype=torch.float32 if w_R is None else w_R.dtype,
                      device=h_RX.device)
    if num_rows == 0:
        return g_h, g_w
    if inter == 0:
        return g_h, g_w.zero_()
    tile = tile or row_tile(inter, interpreted=is_interpreted(_act_bwd_kernel))
    grid = (triton.cdiv(num_rows, tile.block_rows),)
    _act_bwd_kernel[grid](g_RI, h_RX, h_RX if w_R is None else w_R.contiguous(), b, e, g_h,
                          g_w if w_R is not None else g_h, num_rows, inter, g_RI.stride(0), h_RX.stride(0), b_stride,
                          KIND=kind, GATED=gated, HAS_W=w_R is not None, HAS_B=bias is not None,
                          BLOCK_R=tile.block_rows, BLOCK_C=tile.block_cols, num_warps=tile.num_warps)
    return g_h, g_w


@torch.library.custom_op("megamoe::expert_act", mutates_args=())
def expert_act(h_RX: Tensor, w_R: Optional[Tensor], activation: str, b_EX: Optional[Tensor] = None,
               expert_of_row_R: Optional[Tensor] = None, offs_E: Optional[Tensor] = None) -> Tensor:
    """The weighted expert activation (see module docstring); with a bias, ``expert_of_row_R``
    and ``offs_E`` (the group ends) say whose rows are whose."""
    return act_forward(h_RX, w_R, activation, bias=b_EX, expert_of_row=expert_of_row_R)


@expert_act.register_fake
def _(h_RX: Tensor, w_R: Optional[Tensor], activation: str, b_EX: Optional[Tensor] = None,
      expert_of_row_R: Optional[Tensor] = None, offs_E: Optional[Tensor] = None) -> Tensor:
    return h_RX.new_empty(h_RX.shape[0], _inter(h_RX, _kind(activation)[1]))


@torch.library.custom_op("megamoe::expert_act_backward", mutates_args=())
def expert_act_backward(g_RI: Tensor, h_RX: Tensor, w_R: Optional[Tensor], activation: str,
                        b_EX: Optional[Tensor] = None, expert_of_row_R: Optional[Tensor] = None
                        ) -> tuple[Tensor, Tensor]:
    """(d loss / d h, d loss / d w) of :func:`expert_act`."""
    return act_backward(g_RI, h_RX, w_R, activation, bias=b_EX, expert_of_row=expert_of_row_R)


@expert_act_backward.register_fake
def _(g_RI: Tensor, h_RX: Tensor, w_R: Optional[Tensor], activation: str, b_EX: Optional[Tensor] = None,
      expert_of_row_R: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    g_w = h_RX.new_empty(0, dtype=torch.float32) if w_R is None else torch.empty_like(w_R)
    return torch.empty_like(h_RX), g_w


def _setup_context(ctx, inputs, output) -> None:
    h_RX, w_R, activation, b_EX, expert_of_row_R, offs_E = inputs
    if b_EX is not None and (expert_of_row_R is None or offs_E is None):
        raise ValueError("expert_act with a bias needs expert_of_row_R and offs_E")
    ctx.save_for_backward(h_RX, w_R, b_EX, expert_of_row_R, offs_E)
    ctx.activation = activation


def _backward(ctx, g_RI: Tensor):
    from megamoe.kernels.bias import segment_colsum_op

    h_RX, w_R, b_EX, expert_of_row_R, offs_E = ctx.saved_tensors
    g_h, g_w = expert_act_backward(g_RI, h_RX, w_R, ctx.activation, b_EX, expert_of_row_R)
    g_b = segment_colsum_op(g_h, offs_E).to(b_EX.dtype) if b_EX is not None and ctx.needs_input_grad[3] else None
    return g_h, (None if w_R is None else g_w), None, g_b, None, None


expert_act.register_autograd(_backward, setup_context=_setup_context)


def expert_act_reference(h_RX: Tensor, w_R: Tensor | None, activation: str, b_EX: Tensor | None = None,
                         expert_of_row_R: Tensor | None = None, offs_E: Tensor | None = None) -> Tensor:
    """Plain PyTorch (fp32 math, one rounding), with the experts' own functions (megamoe.activations)."""
    _, gated = _kind(activation)
    fn = activation_fn(activation)
    h = h_RX.float()
    if b_EX is not None:
        h = h + b_EX.float().index_select(0, expert_of_row_R)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        a = fn(gate) * up
    else:
        a = fn(h)
    if w_R is not None:
        a = a * w_R.float().unsqueeze(1)
    return a.to(h_RX.dtype)


__all__ = ["ACTIVATIONS", "act_backward", "act_forward", "expert_act", "expert_act_reference"]
