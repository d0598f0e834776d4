"""Saving pruned models atomically and measuring sparsity."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from torch import nn

from .checkpoint import BlockCheckpoints
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
    checkpoints: Optional[BlockCheckpoints] = None,
) -> Path:
    """Write a normal HF directory (safetensors) + alsparse_report.json (+ PNG plots of the
    allocation and RM matrix) under a temporary name, then rename it into place. An existing
    ``out_dir`` is refused unless ``overwrite``; on any error the previous content is left as it was.

    A model whose blocks stay on disk (:mod:`alsparse.lazy`) is written from the run's
    ``checkpoints`` instead: each pruned block's file becomes one shard (hard-linked when
    possible), the non-block weights another, with a ``model.safetensors.index.json``; memory stays
    at one block."""
    from .lazy import is_lazy

    lazy = is_lazy(model)
    if lazy and checkpoints is None:
        raise ValueError("a model streamed from disk is saved from its block checkpoints; pass checkpoints=")
    with _staging(out_dir, overwrite) as tmp:
        if lazy:
            _write_streamed_weights(model, checkpoints, tmp)
        else:
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
    log.info("saved to %s", out_dir)
    return Path(out_dir)


@contextlib.contextmanager
def _staging(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling directory that replaces ``out_dir`` only if the block succeeds. The
    output is locked against other processes meanwhile: of two saves to one path, the second fails
    at once with :class:`~alsparse.locks.InUseError` and the first's files are left whole."""
    from .locks import exclusive, lock_path_for

    out = Path(out_dir)
    with exclusive(lock_path_for(out), f"output directory {out}"):
        if out.exists() and not overwrite:
            raise FileExistsError(f"output directory {out} exists; pass overwrite=True (--overwrite) to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            from .fsmodes import publish_modes

            publish_modes(tmp)  # mkdtemp's drwx------ would make the model private to this user
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_streamed_weights(model: nn.Module, checkpoints: BlockCheckpoints, tmp: Path) -> None:
    from safetensors.torch import save_file

    from .lazy import INDEX, lazy_block
    from .models import BLOCK_PATHS, family

    blocks = decoder_blocks(model)
    source = lazy_block(blocks[0]).source
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(len(blocks)):
        shard = f"model-block-{index:05d}.safetensors"
        src = checkpoints.block_path(index)
        if not src.is_file():
            raise FileNotFoundError(f"block {index} has no checkpoint in {checkpoints.dir}; was it pruned?")
        try:
            os.link(src, tmp / shard)
        except OSError:  # another filesystem: copy
            shutil.copyfile(src, tmp / shard)
        for key, nbytes in source.nbytes(tmp / shard).items():
            weight_map[key] = shard
            total += nbytes
    prefix = BLOCK_PATHS[family(model)] + "."
    names = {name for name in source.files if not name.startswith(prefix)}
    held = {k: v for k, v in model.state_dict().items() if k in names and not v.is_meta}
    rest = {**source.read([n for n in names if n not in held]), **held}  # no second copy of the embeddings
    save_file({k: v.contiguous() for k, v in rest.items()}, str(tmp / "model-rest.safetensors"),
              metadata={"format": "pt"})
    for key, value in rest.items():
        weight_map[key] = "model-rest.safetensors"
        total += value.numel() * value.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


def replace_dir(new: Path, out: Path) -> None:
    """Put directory ``new`` at ``out``; an existing ``out`` is removed only once ``new`` is there."""
    if not out.exists():
        os.replace(new, out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    if backup.exists():  # a killed run's, whose pid this process now has (the caller holds the output lock)
        shutil.rmtree(backup)
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
