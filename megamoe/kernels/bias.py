"""Per-expert biases on routed rows, and their gradients, as torch custom ops.

Shape legend: R routed rows (grouped by expert, expert 0 first), E experts, C columns
(D hidden size or I intermediate size).

- :func:`segment_colsum`: ``out[e] = sum over the rows r of expert e of s_r * src[r]``, the
  gradient of a bias added to (and optionally scaled per row on) each expert's rows. One
  program per (expert, column block, split) walks its run of that expert's rows in order,
  in fp32, and the splits' sums are added in order: no atomics, so it is deterministic, and
  no [R, C] temporary. Splits keep the GPU busy when few experts own many rows.
- ``megamoe::row_bias``: ``out[r] = y[r] + w_r * b[e_r]``, the down projection's bias on the
  rows of a grouped GEMM, scaled by each row's combine weight (the bias is part of the
  expert's output, which the weight scales). One pass instead of building the [R, D] bias
  rows, scaling and adding them. Backward: ``g_y = g``, ``g_b = segment_colsum(g, w)``,
  ``g_w[r] = <g[r], b[e_r]>`` (one row kernel).

Rows are found by ``offs_E`` (the inclusive prefix sum of the group sizes, the ``offs`` of
``torch._grouped_mm``) and ``expert_of_row_R``; rows past ``offs_E[-1]`` belong to no expert.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from megamoe.kernels.launch import check_device, is_interpreted, row_tile


@triton.jit
def _segment_colsum_kernel(src_ptr, scale_ptr, offs_ptr, out_ptr, num_cols, src_stride,
                           HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Grid (expert, column block, split): split s of S sums the s-th of S equal runs of whole
    # row blocks of the expert's rows into out[s, expert] (the caller sums over s).
    e = tl.program_id(0)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < num_cols
    start = tl.load(offs_ptr + tl.maximum(e - 1, 0)).to(tl.int64)
    start = tl.where(e > 0, start, 0)
    end = tl.load(offs_ptr + e).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_R) * BLOCK_R
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):  # this program's rows, in order
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < hi
        v = tl.load(src_ptr + rows[:, None] * src_stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + (split * tl.num_programs(0) + e).to(tl.int64) * num_cols + cols, acc, mask=col_ok)


# Programs segment_colsum aims for (a few per SM of an H100's 132) and the fewest rows each
# program should walk on average (below that, splitting costs more than it gains).
_COLSUM_PROGRAMS = 512
_COLSUM_MIN_ROWS = 256


def _colsum_splits(num_rows: int, num_experts: int, col_blocks: int) -> int:
    """Row splits per expert: one program per (expert, column block) leaves a GPU mostly idle
    with few experts and narrow rows (8 experts x 8 blocks of 128 columns: 64 programs, each
    walking an eighth of all rows), so long groups are cut into runs summed in a second pass."""
    by_programs = triton.cdiv(_COLSUM_PROGRAMS, num_experts * col_blocks)
    by_rows = triton.cdiv(num_rows, num_experts * _COLSUM_MIN_ROWS)
    return max(1, min(by_programs, by_rows))


def segment_colsum(src_RC: Tensor, offs_E: Tensor, scale_R: Tensor | None = None, *,
                   splits: int | None = None) -> Tensor:
    """fp32 [E, C]: each expert's (row-scaled) column sums of ``src_RC`` (raw launch, no autograd).

    ``splits`` (default: from the shape) cuts each expert's rows into that many runs, summed
    separately and then added in split order: deterministic for a given shape."""
    check_device(_segment_colsum_kernel, src_RC, offs_E, *(() if scale_R is None else (scale_R,)))
    src_RC = src_RC.contiguous()
    num_experts, num_cols = offs_E.shape[0], src_RC.shape[1]
    if num_experts == 0 or num_cols == 0:
        return torch.empty(num_experts, num_cols, dtype=torch.float32, device=src_RC.device)
    interpreted = is_interpreted(_segment_colsum_kernel)
    # Narrow column blocks on the GPU, one width for all (one compiled variant).
    block_c = min(triton.next_power_of_2(num_cols), 1024) if interpreted else 128
    col_blocks = triton.cdiv(num_cols, block_c)
    splits = splits or _colsum_splits(src_RC.shape[0], num_experts, col_blocks)
    out = torch.empty(splits, num_experts, num_cols, dtype=torch.float32, device=src_RC.device)
    _segment_colsum_kernel[(num_experts, col_blocks, splits)](
        src_RC, src_RC if scale_R is None else scale_R.contiguous(), offs_E.contiguous(), out, num_cols,
        src_RC.stride(0), HAS_SCALE=scale_R is not None, BLOCK_R=16 if interpreted else 32, BLOCK_C=block_c,
        num_warps=4)
    return out[0] if splits == 1 else out.sum(0)


@triton.jit
def _row_bias_fwd_kernel(y_ptr, b_ptr, e_ptr, w_ptr, out_ptr, num_rows, num_cols, y_stride, b_stride, out_stride,
                         HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < num_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    experts = tl.load(e_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    b = tl.load(b_ptr + experts[:, None] * b_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        b = b * tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    y = tl.load(y_ptr + rows64 * y_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64 * out_stride + cols[None, :], (y + b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_dot_kernel(g_ptr, b_ptr, e_ptr, out_ptr, num_rows, num_cols, g_stride, b_stride,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    experts = tl.load(e_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, num_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < num_cols)[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * g_stride + cols[None, :], mask=mask, other=0.0)
        b = tl.load(b_ptr + experts[:, None] * b_stride + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


def _check(y_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor) -> None:
    if b_ED.dim() != 2 or y_RD.dim() != 2 or b_ED.shape[1] != y_RD.shape[1] or expert_of_row_R.shape != y_RD.shape[:1]:
        raise ValueError(f"row bias: rows {tuple(y_RD.shape)}, bias {tuple(b_ED.shape)} and expert_of_row "
                         f"{tuple(expert_of_row_R.shape)} do not fit (want [R, D], [E, D], [R])")


def row_bias_forward(y_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor, w_R: Tensor | None) -> Tensor:
    """``y + w * b[expert_of_row]`` (raw launch, no autograd)."""
    _check(y_RD, b_ED, expert_of_row_R)
    check_device(_row_bias_fwd_kernel, y_RD, b_ED, expert_of_row_R, *(() if w_R is None else (w_R,)))
    y_RD, b_ED = y_RD.contiguous(), b_ED.contiguous()
    num_rows, num_cols = y_RD.shape
    out = torch.empty_like(y_RD)
    if num_rows == 0 or num_cols == 0:
        return out
    tile = row_tile(num_cols, interpreted=is_interpreted(_row_bias_fwd_kernel))
    grid = (triton.cdiv(num_rows, tile.block_rows), triton.cdiv(num_cols, tile.block_cols))
    _row_bias_fwd_kernel[grid](y_RD, b_ED, expert_of_row_R.contiguous(), y_RD if w_R is None else w_R.contiguous(), out,
                               num_rows, num_cols, y_RD.stride(0), b_ED.stride(0), out.stride(0), HAS_W=w_R is not None,
                               BLOCK_R=tile.block_rows, BLOCK_C=tile.block_cols, num_warps=tile.num_warps)
    return out


def row_dot(g_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor) -> Tensor:
    """fp32 [R]: ``<g[r], b[expert_of_row[r]]>`` (raw launch)."""
    _check(g_RD, b_ED, expert_of_row_R)
    check_device(_row_dot_kernel, g_RD, b_ED, expert_of_row_R)
    g_RD, b_ED = g_RD.contiguous(), b_ED.contiguous()
    num_rows, num_cols = g_RD.shape
    out = torch.zeros(num_rows, dtype=torch.float32, device=g_RD.device)
    if num_rows == 0 or num_cols == 0:
        return out
    tile = row_tile(num_cols, interpreted=is_interpreted(_row_dot_kernel))
    _row_dot_kernel[(triton.cdiv(num_rows, tile.block_rows),)](
        g_RD, b_ED, expert_of_row_R.contiguous(), out, num_rows, num_cols, g_RD.stride(0), b_ED.stride(0),
        BLOCK_R=tile.block_rows, BLOCK_C=tile.block_cols, num_warps=tile.num_warps)
    return out


@torch.library.custom_op("megamoe::row_bias", mutates_args=())
def row_bias(y_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor, offs_E: Tensor, w_R: Optional[Tensor]) -> Tensor:
    """``y + w * b[expert_of_row]`` (``offs_E`` is used by the backward)."""
    return row_bias_forward(y_RD, b_ED, expert_of_row_R, w_R)


@row_bias.register_fake
def _(y_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor, offs_E: Tensor, w_R: Optional[Tensor]) -> Tensor:
    _check(y_RD, b_ED, expert_of_row_R)
    return torch.empty_like(y_RD)


@torch.library.custom_op("megamoe::row_bias_backward", mutates_args=())
def row_bias_backward(g_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor, offs_E: Tensor,
                      w_R: Optional[Tensor], need_b: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """(d loss / d b, d loss / d w) of :func:`row_bias`, both fp32; each empty unless needed
    (``need_w`` needs ``w_R``)."""
    g_b = segment_colsum(g_RD, offs_E, w_R) if need_b else g_RD.new_empty(0, dtype=torch.float32)
    g_w = row_dot(g_RD, b_ED, expert_of_row_R) if need_w else g_RD.new_empty(0, dtype=torch.float32)
    return g_b, g_w


@row_bias_backward.register_fake
def _(g_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor, offs_E: Tensor, w_R: Optional[Tensor], need_b: bool,
      need_w: bool) -> tuple[Tensor, Tensor]:
    g_b = g_RD.new_empty(*((offs_E.shape[0], g_RD.shape[1]) if need_b else (0,)), dtype=torch.float32)
    return g_b, g_RD.new_empty(g_RD.shape[0] if need_w else 0, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    _, b_ED, expert_of_row_R, offs_E, w_R = inputs
    ctx.save_for_backward(b_ED, expert_of_row_R, offs_E, w_R)


def _backward(ctx, g_RD: Tensor):
    b_ED, expert_of_row_R, offs_E, w_R = ctx.saved_tensors
    need_b, need_w = ctx.needs_input_grad[1], w_R is not None and ctx.needs_input_grad[4]
    g_b = g_w = None
    if need_b or need_w:  # frozen biases and weights (e.g. adapters-only fine-tuning) cost nothing
        g_b, g_w = row_bias_backward(g_RD.contiguous(), b_ED, expert_of_row_R, offs_E, w_R, need_b, need_w)
    return (g_RD, g_b.to(b_ED.dtype) if need_b else None, None, None, g_w.to(w_R.dtype) if need_w else None)


row_bias.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("megamoe::segment_colsum", mutates_args=())
def segment_colsum_op(src_RC: Tensor, offs_E: Tensor) -> Tensor:
    """:func:`segment_colsum` as an op (torch.compile traces it; used by the activation's backward)."""
    return segment_colsum(src_RC, offs_E)


@segment_colsum_op.register_fake
def _(src_RC: Tensor, offs_E: Tensor) -> Tensor:
    return src_RC.new_empty(offs_E.shape[0], src_RC.shape[1], dtype=torch.float32)


def row_bias_reference(y_RD: Tensor, b_ED: Tensor, expert_of_row_R: Tensor, offs_E: Tensor,
                       w_R: Tensor | None) -> Tensor:
    """Plain PyTorch (fp32 math, one rounding)."""
    b = b_ED.float().index_select(0, expert_of_row_R)
    if w_R is not None:
        b = b * w_R.float().unsqueeze(1)
    return (y_RD.float() + b).to(y_RD.dtype)


def segment_colsum_reference(src_RC: Tensor, offs_E: Tensor, scale_R: Tensor | None = None) -> Tensor:
    """Plain PyTorch: one slice sum per expert."""
    src = src_RC.float() if scale_R is None else src_RC.float() * scale_R.float().unsqueeze(1)
    ends = offs_E.tolist()
    return torch.stack([src[s:t].sum(0) for s, t in zip([0] + ends[:-1], ends)]) if ends else \
        src.new_zeros(0, src.shape[1])


__all__ = ["row_bias", "row_bias_reference", "row_dot", "segment_colsum", "segment_colsum_reference"]
