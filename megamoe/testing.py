"""Run a function on N real processes joined in a torch.distributed process group.

Used by the distributed tests and benchmarks. Where the ranks run is decided by
:func:`select_backend`: NCCL with one GPU per rank when the machine has at least as many GPUs
as ranks, otherwise gloo on the CPU with CUDA hidden from the ranks (``CUDA_VISIBLE_DEVICES=``),
so DeepSpeed and torch never try to place rank r on a GPU that does not exist. Under NCCL the
default group also carries gloo for CPU tensors (``cpu:gloo,cuda:nccl``), so code that
exchanges CPU tensors runs unchanged. Each run prints one line (``megamoe.testing: ...``)
saying which backend it used; the test suite's summary lists them.

Each rank's return value is moved to the CPU, saved with torch.save and handed back in rank
order, so tests compare real multi-process results against a single-process reference.
Nothing here mocks torch.distributed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamoe.parallel import cuda_device_for_rank, free_port

BACKENDS = ("gloo", "nccl")
BACKEND_LINE = "megamoe.testing:"  # prefix of the line each run prints (collected by tests/conftest.py)


def select_backend(world_size: int, cuda_device_count: int) -> str:
    """``nccl`` when every rank can have a GPU of its own, else ``gloo`` (ranks on the CPU)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: must be >= 1")
    return "nccl" if cuda_device_count >= world_size else "gloo"


def default_backend(world_size: int) -> str:
    """:func:`select_backend` for this machine's GPUs."""
    return select_backend(world_size, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def rank_device(rank: int, backend: str) -> torch.device:
    """Where rank ``rank`` computes under ``backend``: its own GPU for NCCL, else the CPU."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, out_dir: str,
            args: tuple, env: dict[str, str], timeout_s: float) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    os.environ.update(env)
    torch.set_num_threads(max(1, int(os.environ.get("MEGAMOE_THREADS_PER_RANK", "1"))))
    group_backend = backend
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_for_rank(rank, torch.cuda.device_count()))
        group_backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(group_backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = _to_cpu(fn(rank, world_size, *args))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _env_for_children(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for processes started inside the block (spawned children
    read them before they import torch, so a hidden CUDA stays hidden)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None,
                    env: dict[str, str] | None = None, timeout_s: float = 300.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable (a module-level function). The process group is initialised
    before ``fn`` runs and destroyed after. backend: None picks :func:`default_backend`;
    ``gloo`` always runs the ranks on the CPU with CUDA hidden; ``nccl`` needs a GPU per
    rank. Returns the ranks' return values (tensors moved to the CPU) in rank order; an
    exception on any rank is re-raised here with its traceback.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = backend or select_backend(world_size, gpus)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed values are {', '.join(map(repr, BACKENDS))}")
    if backend == "nccl" and gpus < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank: {world_size} ranks, {gpus} GPU(s) visible; "
                         "use backend='gloo' (or None to choose)")
    child_env = {} if backend == "nccl" else {"CUDA_VISIBLE_DEVICES": ""}
    where = f"GPUs 0-{world_size - 1}" if backend == "nccl" else f"CPU, CUDA hidden; {gpus} GPU(s) here"
    print(f"{BACKEND_LINE} {getattr(fn, '__qualname__', fn)} on {world_size} rank(s): {backend} ({where})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="megamoe-dist-") as out_dir, _env_for_children(child_env):
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
