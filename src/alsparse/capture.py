"""Block-by-block execution: capture the inputs of block 0, then stream the blocks one at a time.

Memory on the compute device is one block plus the calibration activations (or just one
micro-batch of them with ``offload="cpu"``), whatever the depth of the model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import compute
from .models import LinearRef, decoder_blocks, find_linears, inference_mode, layer_types, onload, onload_except

if TYPE_CHECKING:
    from .pruning.stats import InputStats

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Private control flow: raised by the capture hook once block inputs are recorded."""


@dataclass
class BlockCall:
    """Everything a block is called with besides its hidden states, for one micro-batch."""

    args: tuple
    kwargs: dict


@dataclass
class Activations:
    """Hidden states entering the current block, per micro-batch, plus per-layer-type call args."""

    hidden: list[torch.Tensor]  # each [B, T, D]
    calls: dict[str, list[BlockCall]]  # layer type -> per micro-batch
    store: torch.device  # where hidden states live between blocks
    starts: list[int] = field(default_factory=list)  # global index of each micro-batch's first window
    total_windows: int = 0  # windows of the whole calibration (all processes), within head()
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not self.starts:  # one process, micro-batches in order
            self.starts = [sum(h.shape[0] for h in self.hidden[:j]) for j in range(len(self.hidden))]
            self.total_windows = sum(h.shape[0] for h in self.hidden)
            self.batch_size = max((h.shape[0] for h in self.hidden), default=1)

    @property
    def tokens(self) -> int:
        """Tokens held by this process."""
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @property
    def seq_len(self) -> int:
        return self.hidden[0].shape[1]

    @property
    def total_tokens(self) -> int:
        """Tokens of the whole calibration, over all processes."""
        return self.total_windows * self.seq_len

    def token_offset(self, j: int) -> int:
        """Global index of the first token of micro-batch ``j``."""
        return self.starts[j] * self.seq_len

    def with_hidden(self, hidden: list[torch.Tensor]) -> "Activations":
        return Activations(hidden, self.calls, self.store, self.starts, self.total_windows, self.batch_size)

    def head(self, windows: Optional[int]) -> "Activations":
        """The first micro-batches (globally) covering at least ``windows`` calibration windows
        (None: all); under data parallelism, this process's share of them."""
        if windows is None:
            return self
        kept_batches = -(-min(windows, self.total_windows) // self.batch_size)
        total = min(self.total_windows, kept_batches * self.batch_size)
        taken = sum(1 for start in self.starts if start < total)
        calls = {kind: per_batch[:taken] for kind, per_batch in self.calls.items()}
        return Activations(self.hidden[:taken], calls, self.store, self.starts[:taken], total, self.batch_size)


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    for key in ("use_cache", "past_key_values", "past_key_value", "cache", "layer_past"):
        if key in kwargs:
            kwargs[key] = False if key == "use_cache" else None
    return hidden, BlockCall(rest, kwargs)


@contextlib.contextmanager
def _recording(block: nn.Module, sink: list) -> Iterator[None]:
    def hook(module, args, kwargs):
        sink.append(_split_call(args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _run_until(model: nn.Module, block: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, BlockCall]:
    sink: list = []
    with _recording(block, sink):
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    if not sink:
        raise RuntimeError("the capture hook never fired: the model did not call its first decoder block")
    return sink[0]


def capture_block_inputs(
    model: nn.Module,
    calibration: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    offload: str = "device",
    starts: Optional[list[int]] = None,
) -> Activations:
    """Run ``calibration [N, T]`` up to block 0 and record its inputs and kwargs per micro-batch.
    ``starts``: the first window of each micro-batch to run (default all; a data-parallel process
    passes its share)."""
    blocks = decoder_blocks(model)
    types = layer_types(model, len(blocks))
    store = torch.device("cpu") if offload == "cpu" else device
    starts = list(range(0, calibration.shape[0], batch_size)) if starts is None else starts
    hidden: list[torch.Tensor] = []
    calls: dict[str, list[BlockCall]] = {types[0]: []}
    with inference_mode(model), onload_except(model, blocks, device):
        for start in starts:
            ids = calibration[start : start + batch_size].to(device)
            h, call = _run_until(model, blocks[0], ids)
            hidden.append(h.to(store))
            calls[types[0]].append(_share(call, calls[types[0]][-1] if calls[types[0]] else None))
        for kind in dict.fromkeys(types[1:]):
            if kind not in calls:
                calls[kind] = _capture_other_type(model, blocks, types.index(kind), calibration, device, batch_size,
                                                  starts)
    return Activations(hidden, calls, store, starts, int(calibration.shape[0]), batch_size)


def _share(call: BlockCall, previous: Optional[BlockCall]) -> BlockCall:
    """``call`` with each tensor argument equal to the previous micro-batch's replaced by that one:
    position embeddings, ids and masks repeat across same-shaped micro-batches, and holding one copy
    instead of one per micro-batch saves ~0.5 MiB per 1024-token window on SmolLM2 (more on wider
    models and with materialised masks)."""
    if previous is None:
        return call

    def same(new, old):
        if torch.is_tensor(new) and torch.is_tensor(old):
            equal = new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
            return old if equal and torch.equal(new, old) else new
        if isinstance(new, tuple) and isinstance(old, tuple) and len(new) == len(old):
            return tuple(same(n, o) for n, o in zip(new, old))
        return new

    args = tuple(same(a, previous.args[i]) if i < len(previous.args) else a for i, a in enumerate(call.args))
    kwargs = {k: same(v, previous.kwargs[k]) if k in previous.kwargs else v for k, v in call.kwargs.items()}
    return BlockCall(args, kwargs)


def _capture_other_type(model, blocks, first, calibration, device, batch_size, starts) -> list[BlockCall]:
    """Call args of another layer type (e.g. sliding-window masks): they depend on shapes only,
    so run each distinct micro-batch shape once through blocks 0..first-1 and reuse them."""
    by_shape: dict[tuple, BlockCall] = {}
    out = []
    with contextlib.ExitStack() as stack:
        for block in blocks[:first]:
            stack.enter_context(onload(block, device))
        for start in starts:
            ids = calibration[start : start + batch_size]
            if tuple(ids.shape) not in by_shape:
                by_shape[tuple(ids.shape)] = _run_until(model, blocks[first], ids.to(device))[1]
            out.append(by_shape[tuple(ids.shape)])
    return out


def _first(output):
    """Decoder layers return a tensor on recent transformers and a tuple on older ones."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockStep:
    """One onloaded block in a stream: run it (optionally with input hooks), edit it, move on."""

    index: int
    block: nn.Module
    layer_type: str
    inputs: Activations
    device: torch.device
    linears: list[LinearRef] = field(default_factory=list)
    owns_inputs: bool = False  # True: outputs may overwrite the inputs, micro-batch by micro-batch

    def run(
        self,
        hooks: Optional[dict[str, Callable[[torch.Tensor, torch.Tensor], None]]] = None,
        keep_outputs: bool = True,
    ) -> Optional[list[torch.Tensor]]:
        """Run every micro-batch through the block; ``hooks[name](x, y)`` sees each named linear's
        input ``x [B, T, I]`` and output ``y [B, T, O]``. When the step owns its inputs, each
        output replaces its input as soon as it is computed, so activations are held once."""
        modules = {ref.name: ref.module for ref in self.linears}

        def exact(fn):  # statistics and summaries in full precision, also inside a lowered forward
            def hook(module, args, out):
                with compute.exact(self.device):
                    fn(args[0], out)
            return hook

        handles = [modules[name].register_forward_hook(exact(fn)) for name, fn in (hooks or {}).items()]
        in_place = keep_outputs and self.owns_inputs
        outputs: list[torch.Tensor] = self.inputs.hidden if in_place else []
        try:
            for j, call in enumerate(self.inputs.calls[self.layer_type]):
                with compute.lowered(self.device):
                    out = _first(self.block(self.inputs.hidden[j].to(self.device), *call.args, **call.kwargs))
                if in_place:
                    outputs[j] = out.to(self.inputs.store)
                elif keep_outputs:
                    outputs.append(out.to(self.inputs.store))
        finally:
            for handle in handles:
                handle.remove()
        return outputs if keep_outputs else None


def stream_blocks(
    model: nn.Module, inputs: Activations, device: torch.device, desc: str = "blocks", consume: bool = False
) -> Iterator[BlockStep]:
    """Yield each block onloaded to ``device``; after the caller is done with a step, its
    outputs (recomputed with whatever the caller changed) become the next block's inputs.
    The caller may set ``step.outputs`` to reuse outputs it already computed. ``inputs`` itself is
    overwritten only with ``consume=True``; later blocks' inputs are always the stream's own."""
    blocks = decoder_blocks(model)
    types = layer_types(model, len(blocks))
    with inference_mode(model):
        for index in tqdm(range(len(blocks)), desc=desc, unit="block", leave=False, disable=_quiet()):
            with onload(blocks[index], device) as block:
                step = BlockStep(index, block, types[index], inputs, device, find_linears(block), consume or index > 0)
                yield step
                outputs = getattr(step, "outputs", None)
                if outputs is None:
                    outputs = step.run()
            inputs = inputs.with_hidden(outputs)
            _check_finite(outputs, index)


def _quiet() -> bool:
    """Progress bars come from one process only (rank 0 under torchrun)."""
    from .distributed import is_main

    return not is_main()


def _check_finite(outputs: list[torch.Tensor], index: int) -> None:
    if not all(torch.isfinite(h).all() for h in outputs):
        raise FloatingPointError(
            f"block {index}: its outputs contain NaN/Inf (fp16 overflow?); load the model in bf16 or fp32"
        )


def chain_hooks(first, second):
    """One ``hook(x, y)`` calling ``first`` (may be None) then ``second``."""
    if first is None:
        return second

    def hook(x, y):
        first(x, y)
        second(x, y)

    return hook


def record_input_stats(step: BlockStep, norms: bool, hessian: bool, keep_outputs: bool = False,
                       hooks: Optional[dict] = None) -> dict[str, "InputStats"]:
    """Run the block once and accumulate each linear's input statistics. Linears fed the very same
    tensor (q/k/v, gate/up) share one accumulator, so a SparseGPT Hessian is built once per input.
    ``keep_outputs``: also keep the block's outputs as ``step.outputs`` (the stream then reuses them
    instead of running the block again: right when the block is not changed before moving on).
    ``hooks``: more ``hooks[name](x, y)`` to call in the same run (after the statistics')."""
    from .pruning.stats import InputStats

    owner: dict[str, str] = {}
    stats: dict[str, InputStats] = {}
    first_seen: dict[tuple, str] = {}
    held: list[torch.Tensor] = []  # keeps micro-batch 0 inputs alive, so no address is reused

    def make(ref: LinearRef):
        def hook(x: torch.Tensor, y: torch.Tensor) -> None:
            name = ref.name
            if name not in owner:  # this linear's first call: micro-batch 0
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
                owner[name] = first_seen.setdefault(key, name)
                held.append(x)
                if owner[name] == name:
                    stats[name] = InputStats(ref.in_features, step.device, norms, hessian)
            if owner[name] == name:
                stats[name].update(x)

        return hook

    ours = {ref.name: make(ref) for ref in step.linears}
    for name, extra in (hooks or {}).items():
        ours[name] = chain_hooks(ours.get(name), extra)
    outputs = step.run(ours, keep_outputs=keep_outputs)
    if keep_outputs:
        step.outputs = outputs
    held.clear()
    from . import distributed

    for ref in step.linears:  # the same order in every process
        if owner.get(ref.name) == ref.name:
            if distributed.world_size() > 1:
                stats[ref.name].reduce_(distributed.all_reduce_)
            stats[ref.name].check_finite(f"block {step.index} {ref.name}")
    return {name: stats[first] for name, first in owner.items()}
