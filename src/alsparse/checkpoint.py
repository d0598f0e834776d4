"""Per-block checkpoints, so a prune killed at block k resumes at block k.

A checkpoint directory holds ``manifest.json`` (a fingerprint of the run: config, dense model and
calibration, plus the allocation once it is known) and, per finished block, its pruned linear
weights as ``block-00007.safetensors`` with their SHA-256 in ``block-00007.sha256``. Every file is
written under a temporary name and renamed, the hash after the weights, so a file cut short by a
kill is never taken for a finished block. On resume the longest run of intact blocks 0..k-1 is
loaded (never re-pruned), their outputs recomputed by running them forward, and pruning goes on at
block k; a damaged checkpoint is logged and that block redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import PruneConfig
from .data.calibration import fingerprint as calibration_fingerprint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
_SAMPLE = 4096  # values per tensor that enter the model fingerprint


class CheckpointMismatchError(ValueError):
    """The checkpoint directory belongs to a different run (model, calibration or options)."""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model config and every parameter's name, shape, dtype and an evenly spaced
    sample of its values: cheap for a 70B model, and any different checkpoint of the same
    architecture changes it. A model streamed from disk is fingerprinted from its files."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    from .lazy import is_lazy, lazy_block
    from .models import decoder_blocks

    if is_lazy(model):  # the blocks are on disk: fingerprint the files rather than read them all
        lazy_block(decoder_blocks(model)[0]).source.fingerprint(h)
        return "files:" + h.hexdigest()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step].to("cpu").contiguous()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(model: nn.Module, calibration: Optional[torch.Tensor], config: PruneConfig) -> dict[str, Any]:
    """Everything the pruned weights depend on. ``device`` is left out on purpose: resuming a CPU
    run on a GPU is allowed (masks agree up to ties)."""
    from . import __version__

    cfg = config.to_dict()
    cfg.pop("device", None)
    return {
        "format": FORMAT,
        "alsparse": __version__,
        "config": cfg,
        "model": model_fingerprint(model),
        "calibration": calibration_fingerprint(calibration) if isinstance(calibration, torch.Tensor) else None,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key} (checkpoint: {a!r}, now: {b!r})")
    return out


class BlockCheckpoints:
    """The checkpoint directory of one prune run."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.manifest: dict[str, Any] = {}
        self.writer = True  # False in data-parallel processes other than rank 0: they only read
        self._lock = contextlib.ExitStack()

    def _block(self, index: int, suffix: str) -> Path:
        return self.dir / f"block-{index:05d}.{suffix}"

    def block_path(self, index: int) -> Path:
        """The safetensors file of block ``index`` (full parameter names: a ready model shard)."""
        return self._block(index, "safetensors")

    def open(self, fingerprint: dict[str, Any], resume: bool) -> Optional[dict[str, Any]]:
        """Start or resume. Returns the saved allocation state when resuming (None otherwise).
        An existing checkpoint without ``resume`` is refused (it may be hours of work); one made
        by a different run is refused with the differences named. The directory stays locked
        against other processes (:mod:`alsparse.locks`) until :meth:`release` or :meth:`remove`:
        a second run on it (two resumes of one interrupted prune) fails at once with InUseError
        instead of interleaving blocks."""
        from .locks import exclusive, lock_path_for

        self._lock.enter_context(exclusive(lock_path_for(self.dir), f"checkpoint directory {self.dir}"))
        try:
            return self._open(fingerprint, resume)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let other processes use the directory (the checkpoints stay)."""
        self._lock.close()

    def __del__(self) -> None:  # an object dropped without remove()/release() frees its lock
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()

    def _open(self, fingerprint: dict[str, Any], resume: bool) -> Optional[dict[str, Any]]:
        manifest_path = self.dir / MANIFEST
        if manifest_path.is_file():
            if not resume:
                raise FileExistsError(
                    f"checkpoints of an interrupted run are in {self.dir}; pass --resume (resume=True) to continue "
                    f"it, or delete that directory to start over"
                )
            try:
                saved = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointMismatchError(f"checkpoint manifest {manifest_path} is unreadable ({exc}); "
                                              f"delete {self.dir} to start over") from exc
            diff = _differences(saved.get("fingerprint", {}), fingerprint)
            if diff:
                raise CheckpointMismatchError(
                    f"the checkpoints in {self.dir} were made by a different run; it differs in: {'; '.join(diff)}. "
                    f"Rerun with the same model, calibration and options, or delete {self.dir} to start over"
                )
            self.manifest = saved
            log.info("resuming from the checkpoints in %s", self.dir)
            return saved.get("allocation")
        if resume:
            log.warning("--resume: no checkpoint in %s, starting from block 0", self.dir)
        if self.dir.exists():  # a run killed before its manifest was written left nothing of value
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.manifest = {"fingerprint": fingerprint, "allocation": None}
        self._write_manifest()
        return None

    def _write_manifest(self) -> None:
        _write_atomic(self.dir / MANIFEST, json.dumps(self.manifest, indent=1, default=str).encode())

    def save_allocation(self, state: dict[str, Any]) -> None:
        if not self.writer:
            return
        self.manifest["allocation"] = state
        self._write_manifest()

    def save_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        if not self.writer:
            return
        data = save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, metadata={"format": "pt"})
        weights = self._block(index, "safetensors")
        _write_atomic(weights, data)
        _write_atomic(self._block(index, "sha256"), hashlib.sha256(data).hexdigest().encode())

    def _intact(self, index: int) -> bool:
        weights, digest = self._block(index, "safetensors"), self._block(index, "sha256")
        if not weights.is_file() or not digest.is_file():
            return False
        if sha256_file(weights) != digest.read_text().strip():
            log.warning("checkpoint of block %d (%s) is damaged (SHA-256 mismatch); pruning it again", index, weights)
            return False
        return True

    def intact_prefix(self, num_blocks: int) -> int:
        """How many blocks 0..k-1 have intact checkpoints (hash verified; damaged ones are logged)."""
        for index in range(num_blocks):
            if not self._intact(index):
                return index
        return num_blocks

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        """The saved tensors of block ``index``, one :meth:`intact_prefix` has verified."""
        from safetensors.torch import load_file

        return load_file(str(self._block(index, "safetensors")))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()
