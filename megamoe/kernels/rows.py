"""Routed rows to and from tokens, as torch custom ops: each is the other's backward.

Shape legend: T tokens, K slots per token, R routed rows, D hidden size.

- ``megamoe::permute``: ``x_RD[r] = x_TD[token_idx_R[r]]``. Its backward is the gather-sum below.
- ``megamoe::combine``: ``out_TD[t] = sum_k y_RD[row_of_slot_TK[t, k]]`` over kept slots, summed
  in slot order in fp32 and rounded once. The rows arrive already weighted (the experts apply
  the combine weights, fused into their activation; see :mod:`megamoe.kernels.activation`).
  Its backward is the row gather ``g_y[r] = g_out[token_idx_R[r]]`` (permute).

``row_of_slot_TK`` is the inverse of the routed order: the row of slot (t, k), or -1 where the
slot was dropped (see ``megamoe.dispatch.base.map_slots``). The gather-sum is one program per
block of tokens: no atomics, so it is deterministic, writes every output row exactly once
(tokens whose slots were all dropped get zeros) and needs no [T, K, D] buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megamoe.kernels.launch import Tile, check_device, is_interpreted, row_tile


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, num_rows, num_cols, src_stride, out_stride,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Rows on grid axis 0 (up to 2^31 programs), column chunks on axis 1.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    src_rows = tl.load(idx_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    mask = row_ok[:, None] & (cols < num_cols)[None, :]
    vals = tl.load(src_ptr + src_rows[:, None] * src_stride + cols[None, :], mask=mask & (src_rows >= 0)[:, None],
                   other=0.0)  # index -1: a zero row
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], vals, mask=mask)


def gather_rows(src: Tensor, idx_R: Tensor, *, tile: Tile | None = None) -> Tensor:
    """``src[idx_R]`` for a 2-D ``src``, a zero row where the index is -1 (the raw kernel
    launch, no autograd)."""
    check_device(_gather_rows_kernel, src, idx_R)
    if src.stride(-1) != 1:
        src = src.contiguous()
    num_rows, num_cols = idx_R.shape[0], src.shape[1]
    out = src.new_empty(num_rows, num_cols)
    if num_rows == 0 or num_cols == 0:
        return out
    tile = tile or row_tile(num_cols, interpreted=is_interpreted(_gather_rows_kernel))
    grid = (triton.cdiv(num_rows, tile.block_rows), triton.cdiv(num_cols, tile.block_cols))
    _gather_rows_kernel[grid](src, idx_R.contiguous(), out, num_rows, num_cols, src.stride(0), out.stride(0),
                              BLOCK_R=tile.block_rows, BLOCK_C=tile.block_cols, num_warps=tile.num_warps)
    return out


@torch.library.custom_op("megamoe::permute", mutates_args=())
def permute(x_TD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    """Routed rows ``x_TD[token_idx_R]``, zeros where the index is -1 (``row_of_slot_TK`` is
    used by the backward)."""
    return gather_rows(x_TD, token_idx_R)


@permute.register_fake
def _(x_TD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    return x_TD.new_empty(token_idx_R.shape[0], x_TD.shape[1])


def _save_maps(ctx, inputs, output) -> None:
    """Both ops' setup: they take (rows, token_idx_R, row_of_slot_TK) and each one's backward
    is the other op on the same two maps."""
    _, token_idx_R, row_of_slot_TK = inputs
    ctx.save_for_backward(token_idx_R, row_of_slot_TK)


permute.register_autograd(lambda ctx, g: (combine(g.contiguous(), *ctx.saved_tensors), None, None),
                          setup_context=_save_maps)  # combine: defined below, looked up when called


def permute_reference(x_TD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    """Plain PyTorch: the same gather (autograd gives the summed backward)."""
    padded = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
    return padded.index_select(0, torch.where(token_idx_R >= 0, token_idx_R, x_TD.shape[0]))


@triton.jit
def _gather_sum_kernel(src_ptr, row_ptr, out_ptr, num_tokens, num_cols, top_k, src_stride, out_stride,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tok_ok = toks < num_tokens
    col_ok = cols < num_cols
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in range(top_k):  # fixed slot order: the sum is the same on every run
        rows = tl.load(row_ptr + toks.to(tl.int64) * top_k + k, mask=tok_ok, other=-1).to(tl.int64)
        mask = (rows >= 0)[:, None] & col_ok[None, :]
        acc += tl.load(src_ptr + rows[:, None] * src_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_mask = tok_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * out_stride + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def gather_sum(src_RD: Tensor, row_of_slot_TK: Tensor, *, tile: Tile | None = None) -> Tensor:
    """``out[t] = sum_k src[row_of_slot[t, k]]`` (skipping -1), the raw kernel launch."""
    check_device(_gather_sum_kernel, src_RD, row_of_slot_TK)
    if src_RD.stride(-1) != 1:
        src_RD = src_RD.contiguous()
    num_tokens, top_k = row_of_slot_TK.shape
    num_cols = src_RD.shape[1]
    out = src_RD.new_empty(num_tokens, num_cols)
    if num_tokens == 0 or num_cols == 0:
        return out
    tile = tile or row_tile(num_cols, interpreted=is_interpreted(_gather_sum_kernel))
    grid = (triton.cdiv(num_tokens, tile.block_rows), triton.cdiv(num_cols, tile.block_cols))
    _gather_sum_kernel[grid](src_RD, row_of_slot_TK.contiguous(), out, num_tokens, num_cols, top_k,
                             src_RD.stride(0), out.stride(0), BLOCK_T=tile.block_rows, BLOCK_C=tile.block_cols,
                             num_warps=tile.num_warps)
    return out


@torch.library.custom_op("megamoe::combine", mutates_args=())
def combine(y_RD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    """Per-token sum of the routed rows (``token_idx_R`` is used by the backward)."""
    return gather_sum(y_RD, row_of_slot_TK)


@combine.register_fake
def _(y_RD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    return y_RD.new_empty(row_of_slot_TK.shape[0], y_RD.shape[1])


combine.register_autograd(lambda ctx, g: (permute(g.contiguous(), *ctx.saved_tensors), None, None),
                          setup_context=_save_maps)


def combine_reference(y_RD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    """Plain PyTorch: pad one zero row for dropped slots, gather [T, K, D], sum in fp32."""
    num_rows = y_RD.shape[0]
    padded = torch.cat([y_RD, y_RD.new_zeros(1, y_RD.shape[1])])
    idx_TK = torch.where(row_of_slot_TK >= 0, row_of_slot_TK, torch.full_like(row_of_slot_TK, num_rows))
    return padded[idx_TK].float().sum(1).to(y_RD.dtype)


__all__ = ["combine", "combine_reference", "gather_rows", "gather_sum", "permute", "permute_reference"]
