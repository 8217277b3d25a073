"""Permute: gather token rows into routed (expert-sorted) order, as a torch custom op.

Shape legend: T tokens, K slots per token, R routed rows, D hidden size.

``x_RD[r] = x_TD[token_idx_R[r]]``. The backward is the combine kernel's gather-sum:
``g_x[t] = sum_k g_RD[row_of_slot_TK[t, k]]`` over the token's kept slots, in slot order,
one program per block of tokens: no atomics, so it is deterministic and writes every
gradient row exactly once (tokens whose slots were all dropped get zeros).

``row_of_slot_TK`` is the inverse of the routed order: the row of slot (t, k), or -1 where
the slot was dropped (see ``megamoe.dispatch.base.map_slots``).
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
    src_rows = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mask = row_ok[:, None] & (cols < num_cols)[None, :]
    vals = tl.load(src_ptr + src_rows[:, None] * src_stride + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], vals, mask=mask)


def gather_rows(src: Tensor, idx_R: Tensor, *, tile: Tile | None = None) -> Tensor:
    """``src[idx_R]`` for a 2-D ``src`` (the raw kernel launch, no autograd)."""
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
    """Routed rows ``x_TD[token_idx_R]`` (``row_of_slot_TK`` is used by the backward)."""
    return gather_rows(x_TD, token_idx_R)


@permute.register_fake
def _(x_TD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    return x_TD.new_empty(token_idx_R.shape[0], x_TD.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    _, token_idx_R, row_of_slot_TK = inputs
    ctx.save_for_backward(token_idx_R, row_of_slot_TK)


def _backward(ctx, g_RD: Tensor):
    from megamoe.kernels.combine import combine  # the gather-sum op (imports this module: no cycle at load)

    token_idx_R, row_of_slot_TK = ctx.saved_tensors
    return combine(g_RD.contiguous(), row_of_slot_TK, token_idx_R), None, None


permute.register_autograd(_backward, setup_context=_setup_context)


def permute_reference(x_TD: Tensor, token_idx_R: Tensor, row_of_slot_TK: Tensor) -> Tensor:
    """Plain PyTorch: the same gather (autograd gives the summed backward)."""
    return x_TD.index_select(0, token_idx_R)


__all__ = ["gather_rows", "permute", "permute_reference"]
