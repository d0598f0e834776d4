"""Model plumbing: one table maps each family to its decoder blocks; linears are discovered."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from .memory import page_out

# family (config.model_type) -> attribute path of the decoder block list
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}

# family -> the modules applied, in order, to the last block's output to give the logits; a trailing
# "?" marks one a config may leave out (OPT's project_out), skipped then; then final_logit_softcapping
_LLAMA_HEAD = ("model.norm", "lm_head")
HEAD_PATHS: dict[str, tuple[str, ...]] = {
    **{name: _LLAMA_HEAD for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")},
    "opt": ("model.decoder.final_layer_norm?", "model.decoder.project_out?", "lm_head"),
    "gpt2": ("transformer.ln_f", "lm_head"),
    "gpt_neox": ("gpt_neox.final_layer_norm", "lm_head"),
}


class UnsupportedModelError(ValueError):
    pass


def family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BLOCK_PATHS:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported; supported: {', '.join(sorted(BLOCK_PATHS))}"
        )
    return model_type


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    module = model
    for attr in BLOCK_PATHS[family(model)].split("."):
        module = getattr(module, attr)
    return module


def _module_at(model: nn.Module, path: str):
    module = model
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that turn the last block's output into logits, in order (see HEAD_PATHS)."""
    modules = []
    for path in HEAD_PATHS[family(model)]:
        module = _module_at(model, path.rstrip("?"))
        if module is None and not path.endswith("?"):
            raise UnsupportedModelError(f"{type(model).__name__} has no {path}: cannot compute logits from "
                                        "the last block's output")
        if module is not None:
            modules.append(module)
    return modules


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32) from the last decoder block's output ``hidden [B, T, D]``,
    as the model's own forward computes them; each head module is onloaded to ``hidden``'s device
    (a no-op when the caller has onloaded them already)."""
    with contextlib.ExitStack() as stack:
        out = hidden
        for module in head_modules(model):
            out = stack.enter_context(onload(module, hidden.device))(out)
    out = out.float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


def layer_types(model: nn.Module, num_blocks: int) -> list[str]:
    """Per-block attention type (sliding/full) where the config has one, else one shared type."""
    types = getattr(model.config, "layer_types", None)
    if types is None or len(types) < num_blocks:
        return ["default"] * num_blocks
    return [str(t) for t in types[:num_blocks]]


def _is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class LinearRef:
    """A prunable linear inside a block. GPT-2's Conv1D stores its weight as [I, O]: transposed."""

    name: str  # path inside the block, e.g. "self_attn.q_proj"
    module: nn.Module
    transposed: bool

    @property
    def weight_oi(self) -> torch.Tensor:
        w = self.module.weight
        return w.T if self.transposed else w  # [O, I]

    @property
    def in_features(self) -> int:
        return self.weight_oi.shape[1]

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @torch.no_grad()
    def write_(self, weight_oi: torch.Tensor) -> None:
        """Write ``[O, I]`` into the weight: a fresh copy becomes the Parameter's storage (the
        Parameter object stays, so tied names and hooks see the new values).

        Not ``copy_`` into the old storage: a model loaded from safetensors holds its weights in a
        private (copy-on-write) file mapping, and the first write to each 4 KiB page of it costs a
        page fault that copies the page and flushes the other cores' TLBs; on a 2-vCPU VM that was
        ~1/3 of a bf16 Wanda prune of SmolLM2 (0.54 GB of weights: 11 s of 28). A fresh allocation
        faults in anonymous zero pages instead, which cost a fraction of that; the old pages are
        handed back (:func:`alsparse.memory.page_out`), so the resident set does not grow."""
        target = self.module.weight
        new = weight_oi.T if self.transposed else weight_oi
        if new.shape != target.shape:
            raise ValueError(f"{self.name}: writing a {tuple(new.shape)} weight into a {tuple(target.shape)} one")
        if target.is_meta or not target.is_contiguous():
            target.copy_(new)
            return
        old = target.data
        target.data = new.to(device=target.device, dtype=target.dtype, copy=True).contiguous()
        page_out(old)  # the replaced pages: a file mapping's stay resident otherwise


def find_linears(block: nn.Module) -> list[LinearRef]:
    return [
        LinearRef(name, module, transposed=type(module).__name__ == "Conv1D")
        for name, module in block.named_modules()
        if name and _is_prunable(module)
    ]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the decoder blocks' floating-point weights are stored in (the first one found; the
    model's first floating-point parameter for a model of no known family; float32 without any)."""
    try:
        params = decoder_blocks(model).parameters()
    except UnsupportedModelError:
        params = model.parameters()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


LAZY_ATTR = "_alsparse_lazy"  # set on decoder blocks whose weights stay on disk (alsparse.lazy)


@contextlib.contextmanager
def onload(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move a module to ``device`` for the duration of the block, then back. A block loaded lazily
    (:mod:`alsparse.lazy`) is read from disk instead, and dropped again afterwards."""
    lazy = getattr(module, LAZY_ATTR, None)
    if lazy is not None:
        lazy.materialize(module, device)
        try:
            yield module
        finally:
            lazy.release(module)
        return
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def resident(block: nn.Module):
    """A context in which the block's weights are in memory: a no-op unless it streams from disk."""
    return onload(block, torch.device("cpu")) if getattr(block, LAZY_ATTR, None) is not None else contextlib.nullcontext()


@contextlib.contextmanager
def onload_except(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Move everything but the decoder blocks (embeddings, rotary, norms) to ``device``."""
    moved: list[tuple[nn.Module, torch.device]] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child is blocks:
                continue
            if any(sub is blocks for sub in child.modules()):
                visit(child)
                continue
            params = list(child.parameters()) + list(child.buffers())
            if params and params[0].device != device:
                moved.append((child, params[0].device))
                child.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.device != device:
                module._buffers[name] = buf.to(device)

    try:
        visit(model)
        yield
    finally:
        for child, home in moved:
            child.to(home)


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """eval(), use_cache=False and no grad for the duration; all restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if config is not None:
            config.use_cache = old_cache


@contextlib.contextmanager
def streamed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run ordinary forwards with the blocks kept where they are (CPU) and each one onloaded to
    ``device`` just for its own forward: device memory is one block plus the activations."""
    blocks = decoder_blocks(model)
    homes = [next(block.parameters()).device for block in blocks]
    handles = []
    active: dict[int, contextlib.ExitStack] = {}

    def onload_hook(module, args):  # hooks must return None, or they replace args / outputs
        stack = contextlib.ExitStack()
        stack.enter_context(onload(module, device))
        active[id(module)] = stack

    def offload_hook(module, args, output):
        active.pop(id(module)).close()

    for block in blocks:
        handles.append(block.register_forward_pre_hook(onload_hook))
        handles.append(block.register_forward_hook(offload_hook))
    try:
        with onload_except(model, blocks, device):
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for stack in active.values():  # an exception mid-forward may leave one onloaded
            stack.close()
        for block, home in zip(blocks, homes):
            if getattr(block, LAZY_ATTR, None) is None:
                block.to(home)
