"""GPU kernels (Triton) for the MoE layer's memory-bound glue, each beside a plain PyTorch
reference, registered as torch custom ops (``torch.ops.megamoe.*``) so ``torch.compile``
traces a layer that uses them without graph breaks.

Shape legend: T tokens, K slots per token, R routed rows (kept slots grouped by expert),
D hidden size, I expert intermediate size.

One concern per file:
- :mod:`~megamoe.kernels.rows`: permute ``x_RD = x_TD[token_idx_R]`` and combine
  ``out_t = sum_k y[row_of_slot[t, k]]`` in slot order (rows arrive already weighted), each
  the other's backward (the gather-sum walks the inverse slot map: no atomics, deterministic).
- :mod:`~megamoe.kernels.activation`: the expert activation (SwiGLU / GeGLU reading the
  [R, 2I] pre-activation contiguously, or plain GELU / GELU-tanh / ReLU) with the per-row
  combine weight fused; backward recomputes the activation from the saved pre-activation and
  also returns the weight's gradient; an optional per-expert bias is added on load.
- :mod:`~megamoe.kernels.bias`: the down projection's per-expert bias added to (and scaled
  with) the routed rows in one pass, and the per-expert column sums that are the biases'
  gradients (deterministic: programs per expert, column block and run of rows, no atomics).

The GEMMs stay ``torch._grouped_mm``. Triton is an optional extra (``pip install
megamoe[triton]``): nothing outside :mod:`megamoe.kernels` imports it, and the CPU path never
needs it. On CPU tensors the kernels run only under Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before triton is first imported; the test suite does that
in ``tests/conftest.py``.
"""
from __future__ import annotations

import functools

import torch


@torch.compiler.assume_constant_result  # torch.compile reads it once instead of tracing the import
def available() -> bool:
    """Whether triton is installed and importable (the kernels can be loaded)."""
    return _probe_triton()


@functools.cache
def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # absent, or a broken install: both mean no kernels
        return False
    return True


def load() -> None:
    """Import every kernel module, registering ``torch.ops.megamoe.*`` (idempotent).

    Raises ImportError with the install command when triton is missing.
    """
    if not available():
        raise ImportError("megamoe's Triton kernels need the triton package: pip install 'megamoe[triton]' "
                          "(or pip install triton); ExpertConfig.impl='grouped' or 'loop' run without it")
    from megamoe.kernels import activation, bias, rows  # noqa: F401  (registers the ops)


__all__ = ["available", "load"]
