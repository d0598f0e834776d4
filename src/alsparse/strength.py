"""Choose an allocator's strength on held-out calibration windows, never on the evaluation text.

One searchable knob per allocator (ATP's beta, graded ALS's spread): the last quarter of the
calibration windows is held out, every candidate strength (0, i.e. uniform, always among them) is
pruned on the other three quarters and scored by its mean next-token loss on the held-out
windows; the lowest loss wins (ties: the weaker strength). So on calibration data the chosen
allocation never loses to uniform. Two ways to score the candidates:

- ``oneshot`` (default): one stream over the blocks. Each block's statistics come from the dense
  model's inputs (fit windows); for every candidate the block is pruned at that candidate's ratios,
  the candidate's held-out hidden states go through it, and the dense weights are put back. Cost:
  one dense forward of the fit windows plus, per candidate, a held-out forward and the pruner's
  own arithmetic; no model copy.
- ``sequential``: a model copy per candidate pruned exactly as the final run prunes (each block
  calibrated on the outputs of the already-pruned ones), then scored. Cost: one whole prune per
  candidate.

This module calls the engine (:mod:`alsparse.api`); the engine calls it only through
:func:`select`, imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import compute, distributed
from .config import PruneConfig

log = logging.getLogger(__name__)

RECORD = "strength_search"  # the allocation diagnostics key holding the search's record


@dataclass(frozen=True)
class Knob:
    """A strength the configuration leaves to the search: its name, candidates and setter."""

    parameter: str
    candidates: tuple[float, ...]
    set: Callable[[PruneConfig, float], PruneConfig]


def _set_atp_beta(config: PruneConfig, beta: float) -> PruneConfig:
    return dataclasses.replace(config, baselines=dataclasses.replace(config.baselines, atp_beta=float(beta)))


def _set_als_strength(config: PruneConfig, strength: float) -> PruneConfig:
    return dataclasses.replace(config, als=dataclasses.replace(config.als, strength=float(strength)))


def knob(model, config: PruneConfig) -> Optional[Knob]:
    """The knob ``config`` leaves open (ATP without a beta, graded ALS without a strength), or None."""
    if config.allocation == "atp" and config.baselines.atp_beta is None:
        from .allocation import atp_beta_grid
        from .models import decoder_blocks

        grid = atp_beta_grid(len(decoder_blocks(model)), config.sparsity, n=config.baselines.atp_grid)
        return Knob("atp_beta", tuple(float(b) for b in grid), _set_atp_beta)
    if config.allocation == "als" and config.als.solver == "graded" and config.als.strength is None:
        grid = sorted(set(config.als.strength_grid) | {0.0})
        return Knob("als_strength", tuple(grid), _set_als_strength)
    return None


def with_saved(config: PruneConfig, diagnostics: dict[str, Any]) -> PruneConfig:
    """``config`` with the strength an earlier (checkpointed) run's search chose, if it searched."""
    record = diagnostics.get(RECORD)
    if record is None:
        return config
    setter = {"atp_beta": _set_atp_beta, "als_strength": _set_als_strength}[record["parameter"]]
    return setter(config, record["chosen"])


def split(calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out): the last quarter of the windows (at least one) is held out."""
    if calibration.shape[0] < 2:
        raise ValueError("a strength search needs at least 2 calibration windows (3/4 to prune, 1/4 held out); "
                         f"got {calibration.shape[0]}")
    held = max(1, calibration.shape[0] // 4)
    return calibration[:-held], calibration[-held:]


def select(model, calibration: torch.Tensor, config: PruneConfig, data: dict, device) -> tuple[PruneConfig, dict]:
    """The configuration with the searched knob set to the candidate of lowest held-out loss, and
    the search's record for the allocation diagnostics."""
    open_knob = knob(model, config)
    if open_knob is None:
        return config, {}
    fit, heldout = split(calibration)
    from .allocate import allocate

    configs = [open_knob.set(config, value) for value in open_knob.candidates]
    allocations = [allocate(model, cfg, data, warn=False) for cfg in configs]  # from the same pass-1 data
    if config.strength_search == "sequential":
        losses = [_finite(sequential_loss(model, fit, heldout, cfg, a)) for cfg, a in zip(configs, allocations)]
    else:
        losses = oneshot_losses(model, fit, heldout, allocations, config, device)
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    chosen = open_knob.candidates[best]
    for value, loss in zip(open_knob.candidates, losses):
        log.info("%s %.4f: held-out calibration loss %.5f%s", open_knob.parameter, value, loss,
                 "  <- chosen" if value == chosen else "")
    record = {
        "parameter": open_knob.parameter,
        "candidates": list(open_knob.candidates),
        "heldout_loss": losses,
        "chosen": chosen,
        "mode": config.strength_search,
        "fit_windows": int(fit.shape[0]),
        "heldout_windows": int(heldout.shape[0]),
    }
    return open_knob.set(config, chosen), {RECORD: record}


def heldout_loss(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL over ``ids [N, T]`` (positions 1..T-1) with an ordinary forward."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(next(model.parameters()).device)
            with compute.lowered(batch.device):
                logits = model(input_ids=batch, use_cache=False).logits.float()
            total += float(_nll_sum(logits, batch))
            count += batch[:, 1:].numel()
    return total / count


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ``ids [B, T]`` positions 1..T-1 under ``logits [B, T, V]``."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"
    )


def sequential_loss(model, fit: torch.Tensor, heldout: torch.Tensor, config: PruneConfig, allocation) -> float:
    """Prune a copy of ``model`` on ``fit`` with ``allocation`` exactly as the final run prunes
    (block by block on the pruned blocks' outputs), score it on ``heldout``."""
    from .api import prune_

    trial = copy.deepcopy(model)
    try:
        prune_(trial, fit, config, allocation=allocation)
        return heldout_loss(trial, heldout, config.batch_size)
    finally:
        del trial


def oneshot_losses(model, fit: torch.Tensor, heldout: torch.Tensor, allocations: list, config: PruneConfig,
                   device) -> list[float]:
    """Held-out loss of every allocation, each block pruned from the dense model's inputs (see the
    module doc); allocations that are equal are scored once."""
    from .capture import capture_block_inputs, stream_blocks
    from .lazy import release_resident, restore_resident
    from .pruning import PRUNERS

    pruner = PRUNERS.get(config.method)
    distinct: dict[tuple, int] = {}
    index = [distinct.setdefault(_key(a), len(distinct)) for a in allocations]
    unique = [allocations[index.index(k)] for k in range(len(distinct))]
    restore_resident(model)  # streamed from disk: the embeddings and head, released after the capture
    fit_acts, _ = _capture(model, fit, device, config, capture_block_inputs)
    held_acts, held_sharded = _capture(model, heldout, device, config, capture_block_inputs)
    # per candidate, per micro-batch: a block's run replaces list entries, never the tensors, so the
    # candidates share the captured inputs until their first block
    hidden = [list(held_acts.hidden) for _ in unique]
    try:
        with contextlib.closing(stream_blocks(model, fit_acts, device, desc="strength search (oneshot)",
                                              consume=True)) as stream:
            _score_blocks(stream, held_acts, hidden, unique, pruner, config, device)
        sums = _heldout_sums(model, heldout, held_acts, hidden, device, reduce=held_sharded)
    finally:
        release_resident(model)
    return [_finite(sums[k][0] / sums[k][1]) for k in index]


def _score_blocks(stream, held_acts, hidden, unique, pruner, config, device) -> None:
    """Per block: dense statistics of the fit windows, then each candidate's pruned block run on its
    held-out hidden states (in place), the dense weights put back after each."""
    from .capture import BlockStep, record_input_stats

    for step in stream:
        stats = {}
        if pruner.needs_calibration:
            stats = record_input_stats(step, pruner.needs_norms, pruner.needs_hessian, keep_outputs=True)
        dense = [ref.weight_oi.detach().clone() for ref in step.linears]
        # every candidate prunes the same dense linears: a mask pruner's sorts are kept across them (an
        # int64 index per weight; not for blocks where that would exceed ORDERS_BYTES)
        keep = sum(ref.numel for ref in step.linears) * 8 <= ORDERS_BYTES
        orders = {ref.name: {} for ref in step.linears} if keep else None
        try:
            for k, allocation in enumerate(unique):
                _prune_block(step, stats, pruner, allocation, config, orders)
                held = held_acts.with_hidden(hidden[k])
                BlockStep(step.index, step.block, step.layer_type, held, device, step.linears, owns_inputs=True).run()
                for ref, weight in zip(step.linears, dense):
                    ref.write_(weight)
        finally:
            for ref, weight in zip(step.linears, dense):
                ref.write_(weight)


ORDERS_BYTES = 1 << 30


def _finite(loss: float) -> float:
    """A NaN loss (a candidate that broke the model) never wins: it scores +inf."""
    if loss != loss:
        log.warning("a strength candidate gave a NaN held-out loss; it is scored as +inf")
        return float("inf")
    return loss


def _key(allocation) -> tuple:
    return tuple(allocation.effective()), tuple(allocation.nm_n or ())


def _capture(model, ids, device, config, capture_block_inputs):
    """Block-0 inputs of this process's share of ``ids`` and whether they are a share: micro-batches
    shrink so that every process gets one; with fewer windows than processes each runs them all
    (statistics summed over processes then count every window once per process: the same masks)."""
    windows, world = int(ids.shape[0]), distributed.world_size()
    if windows < world:
        return capture_block_inputs(model, ids, device, config.batch_size, config.offload), False
    batch = max(1, min(config.batch_size, windows // world))  # at least one micro-batch per process
    starts = distributed.shard_starts(windows, batch)
    return capture_block_inputs(model, ids, device, batch, config.offload, starts=starts), world > 1


def _prune_block(step, stats, pruner, allocation, config, orders=None) -> None:
    from .api import prune_linear

    for ref in step.linears:
        prune_linear(ref, stats.get(ref.name), step.index, pruner, allocation, config,
                     None if orders is None else orders[ref.name])


def _heldout_sums(model, heldout, held_acts, hidden, device, reduce: bool) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per candidate over all processes' held-out windows."""
    from .models import head_logits, head_modules, onload

    sums = torch.zeros(len(hidden), 2, dtype=torch.float64)
    with torch.no_grad(), contextlib.ExitStack() as onloaded:
        for module in head_modules(model):  # once, not per window (a CPU-resident head, CUDA compute)
            onloaded.enter_context(onload(module, device))
        for k, per_batch in enumerate(hidden):
            for j, h in enumerate(per_batch):
                start = held_acts.starts[j]
                for row in range(h.shape[0]):  # one window's logits at a time: [1, T, V]
                    ids = heldout[start + row : start + row + 1]
                    with compute.lowered(device):
                        logits = head_logits(model, h[row : row + 1].to(device))
                    sums[k, 0] += float(_nll_sum(logits, ids))
                    sums[k, 1] += ids.shape[1] - 1
    if reduce:
        sums = sums.to(device)
        distributed.all_reduce_(sums)
        sums = sums.cpu()
    return [(float(total), int(count)) for total, count in sums.tolist()]
