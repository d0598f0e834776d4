"""Models whose decoder blocks stay on disk: each block's weights are read from the safetensors
shards when the block is onloaded and dropped (back to the meta device) when it is offloaded.

The skeleton is built by transformers on the meta device (accelerate's ``init_empty_weights``, so
buffers such as rotary frequencies are real); embeddings, final norm and lm_head are loaded once.
Every code path that onloads a block (capture, pass 1, pruning, streamed evaluation) goes through
:func:`alsparse.models.onload`, which consults the block's :class:`LazyBlock`. Memory is then one
block plus the non-block weights, whatever the depth; shards are opened per block and closed again,
so their memory maps do not accumulate in the resident set.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .memory import lean_allocator, release_freed_memory
from .models import BLOCK_PATHS, LAZY_ATTR, decoder_blocks, family

log = logging.getLogger(__name__)

ATTR = LAZY_ATTR
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsSource:
    """Tensor names -> shard files of a Hugging Face directory; reads tensors on demand."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype) -> None:
        self.dir = Path(directory)
        self.dtype = dtype
        if (self.dir / INDEX).is_file():
            self.files = dict(json.loads((self.dir / INDEX).read_text())["weight_map"])
        elif (self.dir / SINGLE).is_file():
            self.files = {name: SINGLE for name in _header(self.dir / SINGLE)[0]}
        else:
            raise ValueError(f"{self.dir} has no safetensors weights ({INDEX} or {SINGLE}); streaming from disk "
                             f"needs them (save the model with safe_serialization=True)")

    def __deepcopy__(self, memo: dict) -> "SafetensorsSource":
        return self  # read-only; a deep copy of a lazy model shares its source

    def fingerprint(self, h) -> None:
        """Feed ``h`` (a hashlib object) with each shard's header (names, dtypes, shapes, offsets)
        and evenly spaced samples of its bytes: cheap for any size, sensitive to other weights."""
        import struct

        for file in sorted(set(self.files.values())):
            path = self.dir / file
            size = path.stat().st_size
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                h.update(file.encode() + f.read(header_len))
                step = max(1, (size - 8 - header_len) // 4096)
                for offset in range(8 + header_len, size, step):
                    f.seek(offset)
                    h.update(f.read(64))

    def nbytes(self, file: Path) -> dict[str, int]:
        """Bytes of each tensor in a safetensors file, from its header alone."""
        return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(file)[0].items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, cast to the compute dtype. Read with plain file reads into fresh
        tensors (no memory map of the shard), so the process's memory is what it holds."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ValueError(f"{self.dir}: tensors missing from the safetensors files: {', '.join(missing[:5])}")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            path = self.dir / file
            header, base = _header(path)
            with open(path, "rb") as f:
                for key in keys:
                    out[key] = _read_tensor(f, header[key], base, path, key).to(self.dtype)
        return out


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, byte offsets) and where the data starts."""
    import struct

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_tensor(f, entry: dict, base: int, path: Path, key: str) -> torch.Tensor:
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {key} has dtype {entry['dtype']}, which streaming from disk does not read")
    start, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=dtype)
    buffer = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else None
    if end - start != (0 if buffer is None else buffer.nbytes):
        raise ValueError(f"{path}: tensor {key} holds {end - start} bytes, not shape {entry['shape']} {entry['dtype']}")
    if buffer is not None:
        f.seek(base + start)
        if f.readinto(memoryview(buffer)) != buffer.nbytes:
            raise ValueError(f"{path}: tensor {key} is cut short (truncated file?)")
    return tensor


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class LazyBlock:
    """Attached to a decoder block: where its parameters live on disk."""

    def __init__(self, source: SafetensorsSource, prefix: str) -> None:
        self.source = source
        self.prefix = prefix  # "model.layers.7."
        self.depth = 0

    def __deepcopy__(self, memo: dict) -> "LazyBlock":
        return LazyBlock(self.source, self.prefix)

    def materialize(self, block: nn.Module, device: torch.device) -> None:
        self.depth += 1
        if self.depth > 1:  # nested onload of the same block: already there
            return
        names = [name for name, _ in block.named_parameters()]
        tensors = self.source.read([self.prefix + n for n in names])
        for name in names:
            _set(block, name, tensors[self.prefix + name].to(device))

    def release(self, block: nn.Module) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        for name, p in list(block.named_parameters()):
            _set(block, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        release_freed_memory()


def _read_resident(model: nn.Module, source: SafetensorsSource, prefix: str) -> None:
    """Read the parameters outside the decoder blocks (embeddings, final norm, lm_head) that are
    on the meta device, then re-tie shared weights."""
    resident = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    stored = [n for n in resident if n in source.files]
    values = source.read(stored)
    for name in stored:
        _set(model, name, values[name])
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if still_meta:
        raise ValueError(f"{source.dir}: no weights for {', '.join(still_meta)}")


def release_resident(model: nn.Module) -> None:
    """For a lazy model: drop the parameters outside the decoder blocks (embeddings, final norm,
    lm_head) back to the meta device; :func:`restore_resident` reads them again. Once block 0's
    inputs are captured, pruning needs only the blocks: on SmolLM2 this frees the 0.11 GiB tied
    embedding, a fifth of the fp32 model, while the stream runs. A model in memory is left as is."""
    blocks = decoder_blocks(model)
    if not blocks or lazy_block(blocks[0]) is None:
        return
    prefix = BLOCK_PATHS[family(model)]
    for name, p in list(model.named_parameters(remove_duplicate=False)):  # tied weights: every name
        if not name.startswith(prefix + ".") and not p.is_meta:
            _set(model, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
    release_freed_memory()


def restore_resident(model: nn.Module) -> None:
    """Undo :func:`release_resident` (a no-op when nothing was released)."""
    blocks = decoder_blocks(model)
    lazy = lazy_block(blocks[0]) if blocks else None
    if lazy is not None:
        _read_resident(model, lazy.source, BLOCK_PATHS[family(model)])


def lazy_block(module: nn.Module) -> LazyBlock | None:
    return getattr(module, ATTR, None)


def is_lazy(model: nn.Module) -> bool:
    return any(lazy_block(block) is not None for block in decoder_blocks(model))


def load_lazy(directory: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM whose decoder blocks are read from ``directory`` only while onloaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    lean_allocator()
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    source = SafetensorsSource(directory, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    prefix = BLOCK_PATHS[family(model)]
    _read_resident(model, source, prefix)
    for index, block in enumerate(decoder_blocks(model)):
        setattr(block, ATTR, LazyBlock(source, f"{prefix}.{index}."))
    model.eval()
    log.info("loaded %s lazily: %d blocks stay on disk until used", directory, len(decoder_blocks(model)))
    return model
