"""PruneReport: what was asked, what was done, what it cost. Serialised as alsparse_report.json."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import torch

REPORT_NAME = "alsparse_report.json"


@dataclass
class LinearRecord:
    name: str  # full path, e.g. "model.layers.3.self_attn.q_proj"
    block: int
    unit: str
    numel: int
    allocated: float
    achieved: float
    pattern: str
    mask_sha256: str


@dataclass
class PruneReport:
    config: dict[str, Any]
    model_type: str
    num_blocks: int
    target_sparsity: float
    calibration: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)
    linears: list[LinearRecord] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)
    stage_peak_rss_gib: dict[str, float] = field(default_factory=dict)  # per stage of timings_s
    versions: dict[str, str] = field(default_factory=dict)
    resumed_from_block: Optional[int] = None  # set when pruning resumed from checkpoints
    compute_dtype: str = "float32"  # what the forwards ran in (alsparse.compute), resolved from config's

    @property
    def prunable(self) -> int:
        return sum(r.numel for r in self.linears)

    @property
    def achieved_sparsity(self) -> float:
        """Size-weighted: zeros / elements over the prunable linears of the decoder blocks."""
        total = self.prunable
        return sum(r.achieved * r.numel for r in self.linears) / total if total else 0.0

    @property
    def allocated_sparsity(self) -> float:
        total = self.prunable
        return sum(r.allocated * r.numel for r in self.linears) / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.config.get("method"),
            "allocation": self.config.get("allocation"),
            "pattern": self.config.get("pattern"),
            "target_sparsity": self.target_sparsity,
            "allocated_sparsity": round(self.allocated_sparsity, 6),
            "achieved_sparsity": round(self.achieved_sparsity, 6),
            "prunable_weights": self.prunable,
            "num_linears": len(self.linears),
            "compute_dtype": self.compute_dtype,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "peak_memory": self.peak_memory,
            "stage_peak_rss_gib": self.stage_peak_rss_gib,
            "calibration": self.calibration,
            **({"resumed_from_block": self.resumed_from_block} if self.resumed_from_block is not None else {}),
        }

    def per_block(self) -> list[dict[str, Any]]:
        rows: dict[int, list[LinearRecord]] = {}
        for r in self.linears:
            rows.setdefault(r.block, []).append(r)
        out = []
        for block, recs in sorted(rows.items()):
            n = sum(r.numel for r in recs)
            out.append(
                {
                    "block": block,
                    "allocated": sum(r.allocated * r.numel for r in recs) / n,
                    "achieved": sum(r.achieved * r.numel for r in recs) / n,
                    "numel": n,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneReport":
        d = {k: v for k, v in d.items() if k != "summary"}
        d["linears"] = [LinearRecord(**r) for r in d.get("linears", [])]
        return cls(**d)


def mask_sha256(weight: torch.Tensor) -> str:
    """Hash of the zero pattern of a weight, so two runs' masks can be compared."""
    bits = (weight.detach() == 0).flatten().cpu().numpy()
    import numpy as np

    return hashlib.sha256(np.packbits(bits).tobytes()).hexdigest()


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "alsparse": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _hwm_gib() -> float:
    """Linux's VmHWM (the high-water mark of this process image; getrusage's ru_maxrss also carries
    the peak of the process that exec'd it, so a child of a big test runner would report the
    runner's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_WINDOWS: list[list[float]] = []  # the running peak (GiB) of each open peak_rss_window, outermost first
_PROCESS_PEAK = [0.0]  # folded in before every reset of VmHWM


def _fold() -> float:
    """Fold the current high-water mark into every open window and the process's peak."""
    now = _hwm_gib()
    for box in _WINDOWS:
        box[0] = max(box[0], now)
    _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], now)
    return now


@contextlib.contextmanager
def peak_rss_window() -> Iterator[list[float]]:
    """The peak resident memory of the code inside the ``with`` block: yields a one-element list
    whose value (GiB) is final when the block exits. Windows nest: each reset of Linux's VmHWM
    (``/proc/self/clear_refs``) first folds the mark into every open window, so an outer window's
    peak is the largest of its inner ones and of its own code. Where VmHWM cannot be reset, a
    window reports the process's peak so far (an upper bound)."""
    _fold()
    box = [0.0]
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        box[0] = _PROCESS_PEAK[0]
    _WINDOWS.append(box)
    try:
        yield box
    finally:
        _fold()
        del _WINDOWS[next(i for i, b in enumerate(_WINDOWS) if b is box)]  # by identity: boxes can be equal
        box[0] = round(box[0], 3)


def peak_rss_gib() -> float:
    """Peak resident memory (GiB) since the outermost open :func:`peak_rss_window` began (a sweep's
    cell), or of the whole process when none is open."""
    now = _fold()
    return round(_WINDOWS[0][0] if _WINDOWS else max(_PROCESS_PEAK[0], now), 3)


def peak_memory(device: Optional[torch.device] = None) -> dict[str, float]:
    """Peak resident memory of this process (GiB) and, on CUDA, peak allocated device memory."""
    out = {"peak_rss_gib": peak_rss_gib()}
    if device is not None and device.type == "cuda":
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


class StageTimer:
    """Wall seconds and peak resident memory (GiB) per stage; a stage entered twice adds its
    times and keeps the larger peak."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss_gib: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        with peak_rss_window() as peak:
            try:
                yield
            finally:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        self.peak_rss_gib[stage] = max(self.peak_rss_gib.get(stage, 0.0), peak[0])
