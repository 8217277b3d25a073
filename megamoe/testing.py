"""Run a function on N real processes joined in a torch.distributed process group.

Used by the distributed tests and benchmarks: gloo on CPU, NCCL when enough GPUs exist.
Each rank's return value is saved with torch.save and handed back in rank order, so tests
compare real multi-process results against a single-process reference. Nothing here mocks
torch.distributed.
"""
from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, out_dir: str,
            args: tuple, env: dict[str, str], timeout_s: float) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    os.environ.update(env)
    torch.set_num_threads(max(1, int(os.environ.get("MEGAMOE_THREADS_PER_RANK", "1"))))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None,
                    env: dict[str, str] | None = None, timeout_s: float = 300.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable (a module-level function). The process group is initialised
    before ``fn`` runs and destroyed after. Returns the ranks' return values in rank order;
    an exception on any rank is re-raised here with its traceback.
    """
    backend = backend or default_backend(world_size)
    with tempfile.TemporaryDirectory(prefix="megamoe-dist-") as out_dir:
        mp.spawn(_worker, args=(fn, world_size, free_port(), backend, out_dir, args, env or {}, timeout_s),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def assert_prefix_unchanged(a: torch.Tensor, b: torch.Tensor, what: str = "outputs", rel: float = 1e-6) -> None:
    """Assert two outputs agree up to BLAS rounding (for causality tests: earlier positions
    after a later token changed).

    Not ``torch.equal``: changing a later token changes how many rows each expert's GEMM gets,
    and BLAS kernels round a row differently for different row counts (MKL's small-M path;
    the threshold differs between CPUs), so outputs can move in the last bit while routing
    stays identical. A real leak moves them by the size of the signal, far above ``rel``.
    """
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, a.abs().max().item() if a.numel() else 0.0)
    assert diff <= rel * scale, f"{what} changed: max abs diff {diff:.3e} (> {rel:g} x {scale:.3g})"
