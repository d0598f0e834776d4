"""Data-parallel calibration over torch.distributed (``torchrun``; gloo on CPU, NCCL on GPU).

Each process runs its share of the calibration micro-batches (micro-batch k goes to rank
k mod world, so every micro-batch is exactly the one a single process would run). What the
pruners and allocators consume is summed across processes at block boundaries: Wanda norms and
SparseGPT Hessians (accumulated in float64, so the sum's order does not reach the masks), RM
feature rows (each kept row comes from exactly one process, the others add zeros: exact).
Each linear is pruned by one owner process and broadcast, so every process ends with the same
weights; only rank 0 writes files. Outside ``torchrun`` every helper here is a no-op.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes; returns this process's device (``cuda:LOCAL_RANK``
    on GPU). A no-op (returning ``device``) outside a multi-process launch."""
    if not launched() or _dist():
        return device
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend=backend)
    log.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return device


def shutdown() -> None:
    d = _dist()
    if d:
        d.destroy_process_group()


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (every process gets the same bytes)."""
    d = _dist()
    if d:
        d.all_reduce(tensor)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> None:
    d = _dist()
    if d:
        d.broadcast(tensor, src=src)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its exception) to every process."""
    d = _dist()
    if not d:
        return fn()
    payload: list = [None]
    if d.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as exc:  # noqa: BLE001 - re-raised in every process below
            payload = [("error", exc)]
    d.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def shard_starts(num_windows: int, batch_size: int) -> list[int]:
    """First window of each micro-batch this process runs (micro-batch k -> rank k mod world)."""
    starts = list(range(0, num_windows, batch_size))
    size = world_size()
    mine = starts[rank()::size]
    if not mine:
        raise ValueError(f"{len(starts)} calibration micro-batches cannot feed {size} processes; use more windows "
                         f"(--nsamples) or a smaller --batch-size")
    return mine


def owner(k: int) -> int:
    """The process that prunes the k-th linear of a block."""
    return k % world_size()
