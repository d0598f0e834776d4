"""The verbs: prune_ (mutates the model, returns a report) and save."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, MutableMapping, Optional

import torch
from torch import nn

from . import compute, distributed
from .allocate import Allocation, allocate, allocation_needs, block_prefix
from .capture import BlockStep, capture_block_inputs, record_input_stats, stream_blocks
from .checkpoint import BlockCheckpoints, run_fingerprint
from .config import PruneConfig, search_final
from .data.calibration import fingerprint
from .lazy import release_resident, restore_resident
from .memory import release_freed_memory
from .models import decoder_blocks, find_linears, model_device, onload, weights_dtype
from .pass1 import cache_key as pass1_key
from .pass1 import collect as collect_pass1
from .pruning import PRUNERS
from .report import (
    LinearRecord,
    PruneReport,
    StageTimer,
    mask_sha256,
    peak_memory,
    versions,
)

log = logging.getLogger(__name__)


def prune_(
    model: nn.Module,
    calibration: Optional[torch.Tensor],
    config: PruneConfig,
    calibration_info: Optional[dict] = None,
    *,
    pass1_cache: Optional[MutableMapping[str, dict]] = None,
    checkpoint: Optional[BlockCheckpoints] = None,
    resume: bool = False,
    on_block: Optional[Callable[[int, int], None]] = None,
    allocation: Optional[Allocation] = None,
) -> PruneReport:
    """Prune ``model`` in place: allocate per-unit sparsity, then calibrate, prune and propagate
    block by block so each block sees the outputs of the already-pruned ones.

    ``pass1_cache``: a mapping kept by the caller across prunes of the *same dense model* (a sweep);
    the dense statistics pass is looked up there by what it depends on (calibration, allocator
    needs, ALS feature options) and run only on a miss.

    ``checkpoint``: save each pruned block there; with ``resume=True`` an interrupted run's
    checkpoints (same model, calibration and options, else an error) are loaded instead of pruned
    again, so the run goes on from the first block it had not finished. The directory stays locked
    against other processes until ``checkpoint.remove()`` or ``checkpoint.release()`` (a failed
    prune releases it), so it can be saved from (:func:`alsparse.io.save`) unraced. ``on_block(index, total)``
    is called after each block is pruned (and checkpointed). ``allocation``: prune with this one
    (pass 1, any strength search and the allocator are skipped), e.g. a search's candidate."""
    pruner = PRUNERS.get(config.method)
    device = torch.device(config.device) if config.device else model_device(model)
    needs = allocation_needs(config)
    _check_pattern_fits(model, config)
    _check_lazy(model, config, checkpoint)
    if config.allocation == "search" and allocation is None:
        from .search import check_config

        check_config(config, model)
    compute_dtype = compute.resolve(config.compute_dtype, device, weights_dtype(model))
    try:
        with compute.using(compute_dtype):
            report = _prune(model, calibration, config, calibration_info, pass1_cache, checkpoint, resume, on_block,
                            pruner, device, needs, allocation)
        report.compute_dtype = compute.name(compute_dtype)
        return report
    except BaseException:
        if checkpoint is not None:
            checkpoint.release()  # the checkpoints stay (for --resume); another process may take them
        raise
    finally:
        restore_resident(model)  # a lazy model's embeddings etc., dropped after the capture


def _prune(model, calibration, config, calibration_info, pass1_cache, checkpoint, resume, on_block, pruner, device,
           needs, given=None) -> PruneReport:
    hunting = config.allocation == "search" and given is None
    assembled = hunting and search_final(config.search.final, config.method) == "assembled"
    scratch = None  # the search's level database outlives the search when the model is assembled from it
    if hunting and checkpoint is None and assembled:
        import tempfile
        from pathlib import Path

        scratch = Path(tempfile.mkdtemp(prefix="alsparse-search-"))
    try:
        return _prune_in(model, calibration, config, calibration_info, pass1_cache, checkpoint, resume, on_block,
                         pruner, device, needs, given, hunting, assembled, scratch)
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


def _prune_in(model, calibration, config, calibration_info, pass1_cache, checkpoint, resume, on_block, pruner, device,
              needs, given, hunting, assembled, scratch) -> PruneReport:
    timer = StageTimer()
    search_dir = checkpoint.dir if checkpoint is not None else scratch
    saved, intact = None, 0
    if checkpoint is not None:
        checkpoint.writer = distributed.is_main()  # every process reads checkpoints; one writes them
        with timer("checkpoint"):
            fp = run_fingerprint(model, calibration, config)
            saved = distributed.on_main(lambda: checkpoint.open(fp, resume))
            if saved is not None:
                intact = distributed.on_main(lambda: checkpoint.intact_prefix(len(decoder_blocks(model))))
    acts = None
    if saved is not None:  # resuming: the allocation is known, pass 1 and any search are skipped
        allocation = Allocation.from_state(saved)
        from .strength import with_saved

        config = with_saved(config, allocation.diagnostics)
        if pruner.needs_calibration and not assembled:
            with timer("capture"):
                acts = _capture(model, calibration, device, config)
    elif given is not None:
        allocation = given
        if checkpoint is not None:
            checkpoint.save_allocation(allocation.state())
        if pruner.needs_calibration:
            with timer("capture"):
                acts = _capture(model, calibration, device, config)
    else:
        config, acts, allocation = _allocate(model, calibration, config, pruner, needs, device, timer, pass1_cache,
                                             search_dir, assembled)
        if checkpoint is not None:
            checkpoint.save_allocation(allocation.state())
    with timer("prune"):
        if assembled:
            records = _assemble_blocks(model, calibration, allocation, config, device, checkpoint, intact, on_block,
                                       search_dir)
        else:
            records = _prune_blocks(model, acts, pruner, allocation, config, device, checkpoint, intact, on_block)
    if hunting and "search" in allocation.diagnostics:
        from .strength import heldout_loss, split

        # the final model on the search's held-out windows, whichever way it was made (a sequential
        # prune's statistics include these windows: the figure is biased in its favour)
        with timer("heldout"):
            allocation.diagnostics["search"]["final_heldout_nll"] = heldout_loss(model, split(calibration)[1], 1)
    resumed_from = intact if saved is not None else None
    report = _make_report(model, config, allocation, records, timer, device, calibration, calibration_info)
    report.resumed_from_block = resumed_from
    log.info("pruned to %.4f sparsity (target %.4f)", report.achieved_sparsity, config.sparsity)
    return report


def _allocate(model, calibration, config, pruner, needs, device, timer, pass1_cache, search_dir=None,
              assembled=False):
    """The capture, pass 1 (or its cached result), the strength search the config leaves open
    (ATP's beta, graded ALS's strength) or the searched allocation, and the allocator.
    ``search_dir``: where the searched allocation keeps its state and level database (None: a
    temporary directory of its own); ``assembled``: its final model is assembled from that database
    (no pruning pass, so no capture for one)."""
    hunting = config.allocation == "search"
    searching = hunting or _searches(model, config)
    # the search's held-out windows stay out of the importance too
    pass1_config = _pass1_on_fit_windows(config, calibration) if searching and "features" in needs else config
    pass1_input = calibration
    if searching and needs:  # OWL's and DLP's Wanda statistics too: pass 1 reads the fit windows only
        from .strength import split

        _check_calibration(calibration)
        pass1_input = split(calibration)[0]
    use_cache = bool(needs) and pass1_cache is not None and isinstance(calibration, torch.Tensor)
    key = pass1_key(pass1_config, needs, fingerprint(pass1_input)) if use_cache else None
    cached = pass1_cache.get(key) if key is not None else None
    acts = None
    # the searched allocation collects pass 1 on its level database's stream (the same fit windows)
    merged = hunting and bool(needs) and cached is None
    # a search captures for the pruning pass after it has run: before it, only pass 1 needs the inputs
    if (pruner.needs_calibration and not searching) or (needs and cached is None and not merged):
        with timer("capture"):
            acts = _capture(model, pass1_input, device, config)
    data = None  # merged: collected inside the search (its stage holds the time; no pass-1 stage)
    if not merged:
        with timer("pass1"):
            if cached is not None:
                log.info("pass 1: reusing the cached dense statistics")
                data = cached
            else:
                data = collect_pass1(model, acts, device, pass1_config, needs) if needs else {}
                if key is not None:
                    pass1_cache[key] = data
    search = {}
    if searching:
        _check_calibration(calibration)
        acts = None  # the search holds activations of its own; the pruning pass captures again below
        if hunting:
            from .search import run as run_search

            with timer("search"):
                found, search, data = run_search(model, calibration, config, data, device, state_dir=search_dir,
                                                 pass1=(pass1_config, needs))
            if merged and key is not None:
                pass1_cache[key] = data
            data = {**data, "search": found}
        else:
            from .strength import select

            with timer("strength_search"):
                config, search = select(model, calibration, config, data, device)
        if pruner.needs_calibration and not assembled:
            restore_resident(model)  # from disk: the search released the embeddings again
            with timer("capture"):
                acts = _capture(model, calibration, device, config)
    with timer("allocation"):
        allocation = allocate(model, config, data)
        allocation.diagnostics.update(search)
    if not pruner.needs_calibration:
        acts = None  # captured for pass 1 only: a data-free pruner need not run the blocks again
    return config, acts, allocation


def _pass1_on_fit_windows(config, calibration):
    """``config`` whose pass 1 reads only windows the strength search fits on (not its held-out ones)."""
    import dataclasses

    from .strength import split

    _check_calibration(calibration)
    fit = int(split(calibration)[0].shape[0])
    windows = fit if config.als.windows is None else min(config.als.windows, fit)
    return dataclasses.replace(config, als=dataclasses.replace(config.als, windows=windows))


def _searches(model, config) -> bool:
    from .strength import knob

    return knob(model, config) is not None


def _capture(model, calibration, device, config):
    """Block-0 inputs of this process's share of the calibration micro-batches (all of them in a
    single process)."""
    _check_calibration(calibration)
    starts = distributed.shard_starts(int(calibration.shape[0]), config.batch_size)
    release_freed_memory()  # what loading and tokenising freed, before the activations are allocated
    acts = capture_block_inputs(model, calibration, device, config.batch_size, config.offload, starts=starts)
    release_resident(model)  # streamed from disk: the blocks are all that pruning needs from here on
    release_freed_memory()  # the capture forwards' temporaries
    return acts


def _prune_blocks(model, acts, pruner, allocation, config, device, checkpoint, intact: int, on_block):
    """Prune block after block; with a checkpoint, save each finished block. Blocks below
    ``intact`` (resuming) are loaded from the checkpoints instead of pruned, then run forward for
    the next block's inputs. Returns the per-linear records, taken while each block is onloaded
    (a block streamed from disk is gone afterwards)."""
    records: list[LinearRecord] = []
    prefix = block_prefix(model)
    steps = (
        _steps_without_data(model, config, device)
        if acts is None
        else stream_blocks(model, acts, device, desc=f"{config.method} pruning", consume=True)
    )
    num_blocks = len(decoder_blocks(model))
    if intact:
        log.info("resuming: blocks 0..%d restored from checkpoints, pruning from block %d", intact - 1, intact)
    for step in steps:
        names = {name: f"{prefix}.{step.index}.{name}" for name, _ in step.block.named_parameters()}
        if step.index < intact:
            _restore(step, checkpoint.load_block(step.index), names)
            records.extend(_records(step, allocation, prefix))
            continue  # the stream runs the restored block forward for the next one's inputs
        stats = {}
        if acts is not None and pruner.needs_calibration:
            stats = record_input_stats(step, pruner.needs_norms, pruner.needs_hessian)
        for k, ref in enumerate(step.linears):  # one owner per linear; the others receive its result
            if distributed.owner(k) == distributed.rank():
                prune_linear(ref, stats.get(ref.name), step.index, pruner, allocation, config)
                if ref.name in stats:
                    stats[ref.name].forget_derived()  # pruned once: no H^-1 kept for the rest of the block
        for k, ref in enumerate(step.linears):
            distributed.broadcast_(ref.module.weight.data, src=distributed.owner(k))
        records.extend(_records(step, allocation, prefix))
        if checkpoint is not None:
            params = dict(step.block.named_parameters())
            checkpoint.save_block(step.index, {full: params[name] for name, full in names.items()})
        if on_block is not None:
            on_block(step.index, num_blocks)
    return records


def _assemble_blocks(model, calibration, allocation, config, device, checkpoint, intact: int, on_block, search_dir):
    """The searched allocation's final model taken from its level database: every block gets its
    chosen level's stored weights (the model the search scored; no calibration pass). Blocks below
    ``intact`` (resuming) come from the checkpoints. Returns the per-linear records."""
    from .search import DB_DIR, assemble_block, open_database, top_up_zeros
    from .strength import split

    db = open_database(model, split(calibration)[0], config, search_dir / DB_DIR)
    offsets = allocation.diagnostics["search"]["offsets"]
    prefix, records = block_prefix(model), []
    num_blocks = len(decoder_blocks(model))
    for step in _steps_without_data(model, config, device):
        names = {name: f"{prefix}.{step.index}.{name}" for name, _ in step.block.named_parameters()}
        if step.index < intact:
            _restore(step, checkpoint.load_block(step.index), names)
        else:
            assemble_block(db, step.index, int(offsets[step.index]), step.linears)
            for ref in step.linears:  # the exact counts: a weight more here and there (the database floors)
                if allocation.zeros is not None:
                    top_up_zeros(ref, allocation.zeros[f"{step.index}:{ref.name}"][0])
            if checkpoint is not None:
                params = dict(step.block.named_parameters())
                checkpoint.save_block(step.index, {full: params[name] for name, full in names.items()})
        records.extend(_records(step, allocation, prefix))
        if on_block is not None and step.index >= intact:
            on_block(step.index, num_blocks)
    return records


def _restore(step: BlockStep, tensors: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Copy a checkpointed block (all its parameters, by full name) into the onloaded block."""
    params = dict(step.block.named_parameters())
    if set(tensors) != set(names.values()):
        raise RuntimeError(f"the checkpoint of block {step.index} does not hold this model's parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[names[name]])


def _records(step: BlockStep, allocation: Allocation, prefix: str) -> list[LinearRecord]:
    out = []
    for ref in step.linears:
        allocated, pattern = allocation.target(step.index, ref.name)
        weight = ref.module.weight
        out.append(
            LinearRecord(
                name=f"{prefix}.{step.index}.{ref.name}",
                block=step.index,
                unit=next(u.name for u in allocation.units if u.block == step.index and ref.name in u.linears),
                numel=weight.numel(),
                allocated=allocated,
                achieved=float((weight == 0).sum().item()) / weight.numel(),
                pattern=str(pattern),
                mask_sha256=mask_sha256(weight),
            )
        )
    return out


def _steps_without_data(model, config, device) -> Iterator[BlockStep]:
    """Blocks one at a time, onloaded, for pruners that need no calibration (nothing is run)."""
    from tqdm.auto import tqdm

    blocks = decoder_blocks(model)
    for index, block in enumerate(tqdm(blocks, desc=f"{config.method} pruning", unit="block", leave=False,
                                             disable=not distributed.is_main())):
        with onload(block, device) as onloaded, torch.no_grad():
            yield BlockStep(index, onloaded, "", None, device, find_linears(onloaded))


def prune_linear(ref, stats, block_index, pruner, allocation, config, orders=None) -> None:
    """Prune one linear of an onloaded block in place at its allocated ratio and pattern. ``orders``:
    kept by a caller that prunes the same dense linear several times (mask pruners sort once)."""
    sparsity, pattern = allocation.target(block_index, ref.name)
    if sparsity == 0 and not pattern.is_nm:
        return
    options = {} if orders is None else {"orders": orders}
    new = pruner.prune(
        ref.weight_oi,
        stats,
        sparsity,
        pattern,
        blocksize=config.sparsegpt_blocksize,
        damp=config.sparsegpt_damp,
        **options,
    )
    ref.write_(new)


def _check_pattern_fits(model: nn.Module, config: PruneConfig) -> None:
    pattern = config.parsed_pattern
    if not pattern.is_nm:
        return
    for i, block in enumerate(decoder_blocks(model)):
        for ref in find_linears(block):
            if ref.in_features % pattern.m:
                raise ValueError(
                    f"pattern {pattern} needs in_features divisible by {pattern.m}, but block {i} "
                    f"{ref.name} has {ref.in_features}"
                )


def _check_lazy(model, config, checkpoint) -> None:
    from .lazy import is_lazy

    if not is_lazy(model):
        return
    if checkpoint is None:
        raise ValueError("a model streamed from disk writes each pruned block to its checkpoints; pass checkpoint=")
    if _searches(model, config) and config.strength_search == "sequential":
        raise ValueError("the sequential strength search (ATP's beta, graded ALS's strength) prunes whole copies of the "
                         "model, which streaming from disk avoids; use strength_search='oneshot' (the default), pass "
                         "the strength (--atp-beta / --als-strength) or load the model into memory")


def _check_calibration(calibration) -> None:
    if calibration is None or not isinstance(calibration, torch.Tensor) or calibration.ndim != 2:
        raise ValueError("this method/allocator needs calibration token ids as a LongTensor [N, T]")
    if calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must hold at least one window of >= 2 tokens, got {tuple(calibration.shape)}")


def _make_report(model, config, allocation, records, timer, device, calibration, calibration_info) -> PruneReport:
    calib = dict(calibration_info or {})
    if calibration is not None:
        calib.update(
            {"windows": int(calibration.shape[0]), "seq_len": int(calibration.shape[1])},
            fingerprint=fingerprint(calibration),
        )
    return PruneReport(
        config=config.to_dict(),
        model_type=model.config.model_type,
        num_blocks=len(decoder_blocks(model)),
        target_sparsity=config.sparsity,
        calibration=calib,
        allocation=allocation.to_dict(),
        linears=records,
        timings_s=dict(timer.timings),
        peak_memory=peak_memory(device),
        stage_peak_rss_gib=dict(timer.peak_rss_gib),
        versions=versions(),
    )
