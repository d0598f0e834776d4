"""Saving pruned models atomically and measuring sparsity."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .models import decoder_blocks, find_linears
from .report import REPORT_NAME, PruneReport

log = logging.getLogger(__name__)


def save(
    model: nn.Module,
    tokenizer: Any,
    report: Optional[PruneReport],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    extra_files: Optional[dict[str, bytes]] = None,
    plots: bool = True,
) -> Path:
    """Write a normal HF directory (safetensors) + alsparse_report.json (+ PNG plots of the
    allocation and RM matrix) under a temporary name,
    then rename it into place. An existing ``out_dir`` is refused unless ``overwrite``; on any
    error the previous content is left as it was."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(report.to_json())
            if plots:
                from .plots import write_plots

                write_plots(report, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved to %s", out)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, backup)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def measure_sparsity(model: nn.Module) -> dict[str, float]:
    """zeros / elements per prunable linear of the decoder blocks, plus the size-weighted total."""
    out: dict[str, float] = {}
    zeros = total = 0
    for i, block in enumerate(decoder_blocks(model)):
        for ref in find_linears(block):
            w = ref.module.weight
            z = int((w == 0).sum().item())
            out[f"{i}.{ref.name}"] = z / w.numel()
            zeros += z
            total += w.numel()
    out["total"] = zeros / total if total else 0.0
    return out
