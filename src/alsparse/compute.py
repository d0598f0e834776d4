"""The compute dtype, apart from the storage dtype: the blocks' forwards may run in bf16/fp16 while
the weights stay what they were loaded as (fp32 master weights stay fp32).

How: ``torch.autocast`` around the forwards only. Autocast lowers matmuls, linears and attention
to the compute dtype and leaves the rest (norms, softmax statistics, residual adds) in fp32; the
weights themselves are never cast in place. Everything that is not a forward runs outside it:
Wanda norms and SparseGPT Hessians accumulate in fp32/fp64 (a linear's input statistics are
taken in :func:`exact`), SparseGPT's OBS updates and every weight write work on the master weights
in their own dtype, and the saved model keeps its dtype.

``auto`` picks bf16 where the device has fast bf16 (a CUDA device that supports it; a CPU with
AMX-BF16 or AVX-512-BF16) and the storage dtype elsewhere: on a CPU without them (AVX2 only, for
example) bf16 matmuls are emulated and several times *slower* than fp32. The choice is logged.

The active compute dtype is a context (:func:`using`), set by ``prune_`` and ``evaluate`` for
their duration, and read where the forwards run (:func:`lowered`), so no call signature between
the two has to carry it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch

log = logging.getLogger(__name__)

from .config import COMPUTE_DTYPES, check_compute_dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags (as /proc/cpuinfo spells them) that make bf16 matmuls fast
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_ACTIVE: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar("alsparse_compute", default=None)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """Which of FAST_BF16_CPU_FLAGS this CPU has: torch's own CPU probe (``torch.cpu``; its AMX check
    is for AMX tiles, which every AMX CPU so far pairs with AMX-BF16) joined with the flags line of
    /proc/cpuinfo (Linux). Empty when neither says."""
    flags: set[str] = set()
    for flag, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                flags.add(flag)
        except RuntimeError:  # a build whose probe cannot answer
            pass
    try:
        text = cpuinfo.read_text()
    except OSError:
        return flags
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split()) & set(FAST_BF16_CPU_FLAGS)
            break
    return flags


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 matmuls on ``device`` are faster than fp32, and why (for the log)."""
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return supported, "CUDA device with bf16" if supported else "CUDA device without bf16 support"
    if device.type == "cpu":
        found = sorted(cpu_flags() & set(FAST_BF16_CPU_FLAGS))
        if found:
            return True, f"CPU with {' and '.join(found)}"
        return False, "CPU without AMX-BF16 or AVX-512-BF16 (bf16 matmuls would be emulated, slower than fp32)"
    return False, f"{device.type} device (bf16 not assumed fast)"


def resolve(requested: str, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype:
    """The dtype the forwards run in, for weights stored as ``weights_dtype`` on ``device``.

    ``auto``: bf16 for fp32 weights where :func:`fast_bf16`, else the weights' own dtype. An explicit
    dtype lower than fp32 runs fp32 weights under autocast; weights already stored in half precision
    compute in their own dtype only (autocast cannot raise precision)."""
    check_compute_dtype(requested)
    device = torch.device(device)
    if requested == "auto":
        if weights_dtype != torch.float32:
            chosen, why = weights_dtype, f"the weights are {name(weights_dtype)}"
        else:
            fast, why = fast_bf16(device)
            chosen = torch.bfloat16 if fast else torch.float32
        log.info("compute dtype: %s (auto: %s)", name(chosen), why)
        return chosen
    chosen = _DTYPES[requested]
    if weights_dtype != torch.float32 and chosen != weights_dtype:
        raise ValueError(
            f"compute dtype {requested} needs float32 weights or {requested} weights, but the model is "
            f"{name(weights_dtype)}; load it with --dtype float32 (fp32 master weights) or use compute dtype "
            f"{name(weights_dtype)} / auto"
        )
    return chosen


def name(dtype: Optional[torch.dtype]) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (None: float32, what runs without a context)."""
    return str(dtype or torch.float32).replace("torch.", "")


@contextlib.contextmanager
def using(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Run the forwards inside this context in ``dtype`` (None or float32: unchanged)."""
    token = _ACTIVE.set(dtype)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> Optional[torch.dtype]:
    """The compute dtype of the enclosing :func:`using` (None outside one: what the weights are)."""
    return _ACTIVE.get()


def _lowering(device: torch.device) -> Optional[torch.dtype]:
    dtype = _ACTIVE.get()
    if dtype is None or dtype == torch.float32 or device.type not in ("cpu", "cuda", "xpu", "mps"):
        return None
    return dtype


@contextlib.contextmanager
def lowered(device: torch.device | str) -> Iterator[None]:
    """A forward in the active compute dtype: autocast when it is lower than the weights' fp32.
    (Weights stored in bf16/fp16 compute in their own dtype; autocast then changes nothing.)"""
    device = torch.device(device)
    dtype = _lowering(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def exact(device: torch.device | str) -> Iterator[None]:
    """Inside a lowered forward (a hook), what must not be lowered: statistics, summaries."""
    device = torch.device(device)
    if _lowering(device) is None or not torch.is_autocast_enabled(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield
