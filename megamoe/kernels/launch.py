"""Launch settings shared by the row kernels: tile shapes and the device check.

Every kernel here is a row kernel: a program owns ``block_rows`` rows and walks (or tiles)
the columns in chunks of ``block_cols``. They are memory bound, so the tile is chosen for
wide contiguous accesses (up to 1024 columns, 16-byte vectors per thread with 4 warps) and
few enough rows per program that large layers still launch tens of thousands of programs.
Under Triton's interpreter (CPU tests) each program costs Python time, so tiles are larger.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
from torch import Tensor


@dataclass(frozen=True)
class Tile:
    block_rows: int
    block_cols: int
    num_warps: int


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was created in interpreter mode (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def row_tile(num_cols: int, *, interpreted: bool, block_cols: int | None = None) -> Tile:
    """Tile for a row kernel over ``num_cols`` columns (``block_cols`` overrides the width:
    tests use it to force several column chunks on tiny shapes)."""
    cols = block_cols or min(triton.next_power_of_2(max(num_cols, 1)), 1024)
    if interpreted:
        return Tile(block_rows=16, block_cols=cols, num_warps=1)
    # At least 64 columns on the GPU: narrower rows (toy models, tests) share one compiled
    # variant instead of one per power of two (each variant costs a JIT compile).
    cols = block_cols or max(cols, 64)
    return Tile(block_rows=4, block_cols=cols, num_warps=4 if cols <= 512 else 8)


def check_device(kernel, *tensors: Tensor) -> None:
    """Clear errors for device mix-ups instead of a crash inside Triton."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"megamoe kernel inputs are on different devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            "megamoe's Triton kernels got CPU tensors, but Triton was imported without its interpreter. "
            "Set TRITON_INTERPRET=1 before triton is first imported (tests/conftest.py does it for the test "
            "suite), or use ExpertConfig.impl='loop' / 'auto' on CPU")
