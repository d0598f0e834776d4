"""The searched allocation (``--allocation search``): an evolution over per-block sparsity levels,
scored on held-out calibration windows, never on evaluation text.

1. **Level database.** The calibration windows are split as for a strength search (the last
   quarter held out). One stream over the blocks with the dense model's inputs (fit windows):
   each block's statistics, then every linear pruned at every level of the grid
   (``target + j * step`` within ``target +- span``). Magnitude and Wanda store the mask (packed
   bits), SparseGPT the pruned weights; on disk, in the checkpoint directory when there is one.
   Pass 1 (the warm starts' statistics) is collected on the same dense stream. With
   ``database="sequential"`` each block's levels are pruned from the inputs of the model pruned
   uniformly at the target block by block instead (what a sequential prune sees; SparseGPT's
   weight update depends on it); pass 1 then runs apart on the dense stream.
2. **Warm start.** Uniform, ALS (graded, block level, every strength of its grid), OWL and ATP
   (every beta of its grid) from the same pass-1 data, each quantised to the grid with the budget
   exact, scored on the final selection windows; the best is the start, so the result is never
   worse on that fitness than any of them.
3. **Evolution** (:mod:`alsparse.allocation.evolution`): level-switch mutations inside size groups
   (exact budget), multi-step selection, elitist. A candidate is assembled by writing the stored
   levels into the blocks that differ from the last candidate, then one ordinary forward over the
   held-out windows. Fitness: mean next-token NLL (``loss``) or KL from the dense model's
   next-token distribution (``kl``; the dense log-probabilities are kept on disk, bf16).
4. **Confirmation.** Each generation scores on a sample of the held-out windows; the evolved
   allocation and its start are then scored on all of them and the better is kept (the report's
   ``confirm``), so the result is never worse than the best warm start on the held-out set.
5. The dense weights are put back; the engine then writes each block's chosen level from the
   database (``final="assembled"``: the model the search scored, no further pass; the ``auto``
   default for magnitude and Wanda) or prunes the model sequentially with the found per-block
   ratios (``sequential``, the ``auto`` default for SparseGPT, whose weight update gains from the
   pruned blocks' inputs); exact achieved sparsity either way. The final model's NLL on the
   held-out windows is reported.

With a checkpoint directory the state is saved after every generation and ``--resume`` continues
the search where it stopped (the same allocation as an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import compute
from .allocation.evolution import (
    EvolutionState,
    LevelGrid,
    Stage,
    check_stages,
    evolve,
    generation_cost,
    is_balanced,
    quantize,
    size_groups,
)
from .config import MASK_PRUNERS, Pattern, PruneConfig, search_database, search_final

log = logging.getLogger(__name__)

STATE_FILE = "search_state.json"
DB_DIR = "search_db"
CACHE_BYTES = 256 << 20  # levels read back from disk kept in memory (masks are 1/32 of fp32 weights)
PREFIX_BYTES = 2 << 30  # block outputs kept for the prefix reuse (Scorer); beyond, whole forwards


def _first_difference(a, b) -> int:
    """The first index where two allocations differ (their length when equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def default_budget(calibration_windows: int) -> int:
    return 12 * int(calibration_windows)


def stages_of(config: PruneConfig, seq_len: int, heldout_windows: int) -> list[Stage]:
    """The configured stages; a stage asking for more windows than are held out scores on all of them."""
    stages = []
    for (survivors, windows, _), length in zip(config.search.stages, _lengths(config, seq_len)):
        if windows > heldout_windows:
            log.info("search: a stage asks for %d windows, %d are held out: it scores on all of them",
                     windows, heldout_windows)
        stages.append(Stage(survivors, min(windows, heldout_windows), length / seq_len))
    return stages


def _lengths(config: PruneConfig, seq_len: int) -> list[int]:
    return [seq_len if c is None else min(int(c), seq_len) for _, _, c in config.search.stages]


def check_config(config: PruneConfig, model) -> None:
    """What the search does not support yet, refused before any work."""
    from .lazy import lazy_block
    from .models import decoder_blocks
    from . import distributed

    if distributed.world_size() > 1:
        raise ValueError("allocation 'search' runs in one process (not under torchrun) for now")
    blocks = decoder_blocks(model)
    if blocks and lazy_block(blocks[0]) is not None:
        raise ValueError("allocation 'search' needs the model in memory (not streamed from disk) for now")


def level_grid(config: PruneConfig) -> LevelGrid:
    """The levels searched. Unstructured: ``target + j * step`` within ``target +- span``. N:M: the
    mixed patterns ``(N + j):M`` (step 1/M; the span is at least one step, and no level reaches M:M),
    so every candidate is a per-block N mix whose size-weighted mean is N/M exactly."""
    opts, pattern = config.search, config.parsed_pattern
    if not pattern.is_nm:
        return LevelGrid(float(config.sparsity), opts.step, opts.span)
    step = 1.0 / pattern.m
    return LevelGrid(pattern.n / pattern.m, step, max(opts.span, step), max_sparsity=(pattern.m - 1) / pattern.m)


def level_pattern(config: PruneConfig, grid: LevelGrid, offset: int) -> tuple[float, Pattern]:
    """(sparsity, pattern) of one level: unstructured, or (N + j):M (0:M: left dense)."""
    sparsity, pattern = grid.sparsity(offset), config.parsed_pattern
    if not pattern.is_nm:
        return sparsity, Pattern()
    n = pattern.n + offset
    return n / pattern.m, (Pattern(n, pattern.m) if n > 0 else Pattern())


def _store_levels(db: "LevelDatabase", step, stats: dict, pruner, config: PruneConfig, levels: list) -> None:
    """One block at every ``(offset, (sparsity, pattern))`` of ``levels`` (sparsity 0: the dense
    weights). Mask pruners go linear by linear (one score sort per linear serves every level; only
    packed bits are held), the others level by level (one level's weights held at a time)."""
    options = dict(blocksize=config.sparsegpt_blocksize, damp=config.sparsegpt_damp)
    pruned_levels = [(o, level) for o, level in levels if level[0] > 0]
    if db.masks:
        payloads: dict[int, dict[str, torch.Tensor]] = {o: {} for o, _ in levels}
        for ref in step.linears:
            outputs = pruner.prune_levels(ref.weight_oi, stats.get(ref.name), [lv for _, lv in pruned_levels], **options)
            for (o, _), pruned in zip(pruned_levels, outputs):
                payloads[o][ref.name] = db.payload(pruned)
            for o, (sparsity, _) in levels:
                if sparsity <= 0:
                    payloads[o][ref.name] = db.payload(ref.weight_oi.detach())
        for o, _ in levels:
            db.write(step.index, o, {ref.name: payloads[o][ref.name] for ref in step.linears})
        return
    for o, (sparsity, pattern) in levels:
        db.put(step.index, o, {ref.name: ref.weight_oi.detach() if sparsity <= 0 else
                               pruner.prune(ref.weight_oi, stats.get(ref.name), sparsity, pattern, **options)
                               for ref in step.linears})


class LevelDatabase:
    """Per block and level offset, what turns the dense linears into the pruned ones."""

    def __init__(self, directory: Path, grid: LevelGrid, masks: bool) -> None:
        self.dir, self.grid, self.masks = directory, grid, masks
        self.pass1: Optional[dict] = None  # what a pass 1 collected on the building stream (build_database)
        self._cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._cached_bytes = 0

    def path(self, block: int, offset: int) -> Path:
        return self.dir / f"block-{block:05d}-level-{offset:+04d}.pt"

    def put(self, block: int, offset: int, pruned: dict[str, torch.Tensor]) -> None:
        self.write(block, offset, {name: self.payload(w) for name, w in pruned.items()})

    def payload(self, pruned: torch.Tensor) -> torch.Tensor:
        """What is stored of one pruned linear: its zeros packed to bits, or the weights themselves."""
        return _pack(pruned == 0) if self.masks else pruned.detach().cpu().contiguous()

    def write(self, block: int, offset: int, payload: dict[str, torch.Tensor]) -> None:
        tmp = self.path(block, offset).with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.path(block, offset))

    def weights(self, block: int, offset: int, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The block's linears (``[O, I]``, by name) at this level."""
        key = (block, offset)
        stored = self._cache.get(key)
        if stored is None:
            stored = torch.load(self.path(block, offset), weights_only=True)
            size = sum(t.numel() * t.element_size() for t in stored.values())
            while self._cache and self._cached_bytes + size > CACHE_BYTES:  # oldest first
                old = self._cache.pop(next(iter(self._cache)))
                self._cached_bytes -= sum(t.numel() * t.element_size() for t in old.values())
            self._cache[key] = stored
            self._cached_bytes += size
        if not self.masks:
            return stored
        return {name: w.masked_fill(_unpack(stored[name], w.shape).to(w.device), 0) for name, w in dense.items()}


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def _unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = math.prod(shape)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool)).reshape(shape)


def _db_fingerprint(model, fit: torch.Tensor, config: PruneConfig, grid: LevelGrid, with_compute: bool = True) -> str:
    """What the database's content depends on; ``with_compute=False`` leaves out the compute dtype
    (the device's, under ``auto``: a resume on another device may still assemble what was scored)."""
    from .checkpoint import model_fingerprint
    from .data.calibration import fingerprint

    parts = {"model": model_fingerprint(model), "fit": fingerprint(fit), "method": config.method,
             "grid": dataclasses.asdict(grid), "pattern": str(config.parsed_pattern), "damp": config.sparsegpt_damp,
             "blocksize": config.sparsegpt_blocksize,
             "inputs": search_database(config.search.database, config.method)}
    if with_compute:
        parts["compute"] = compute.name(compute.active())
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def build_database(model, fit: torch.Tensor, config: PruneConfig, grid: LevelGrid, device, directory: Path,
                   pass1=None) -> LevelDatabase:
    """Every block pruned at every level, stored: from the dense model's inputs (fit windows), or for
    a sequential database (``config.search.database``, ``auto`` resolved per pruner) from the inputs
    of the model pruned uniformly at the target block by block (each block's level 0 written for its forward, then the dense weights put
    back: the model leaves dense). ``pass1``: ``(config, needs)`` of a pass 1 to collect on the same
    dense stream (the blocks then run once for both; its result is ``db.pass1``, None when no dense
    stream ran: a sequential database, one reused from disk, or a pruner that needs no calibration)."""
    from .api import _capture
    from .capture import record_input_stats, stream_blocks
    from .pruning import PRUNERS

    pruner = PRUNERS.get(config.method)
    db = LevelDatabase(directory, grid, masks=config.method in MASK_PRUNERS)
    marker = directory / "complete.json"
    key = _db_fingerprint(model, fit, config, grid)
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        log.info("search: reusing the level database in %s", directory)
        return db
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    acts = _capture(model, fit, device, config) if pruner.needs_calibration else None
    sequential = search_database(config.search.database, config.method) == "sequential"
    collector = None
    if pass1 is not None and acts is not None and not sequential:
        from .pass1 import Collector

        collector = Collector(acts, device, pass1[0], pass1[1])
    wanda_stats = collector is not None and "wanda" in collector.needs
    offsets = grid.offsets()
    if acts is None:
        from .api import _steps_without_data

        steps = _steps_without_data(model, config, device)
    else:
        steps = stream_blocks(model, acts, device, desc="search: level database", consume=True)
    with contextlib.closing(steps):
        for step in steps:
            stats = {}
            if acts is not None:
                hooks = collector.start_block(step, own_stats=False) if collector is not None else None
                stats = record_input_stats(step, pruner.needs_norms or wanda_stats, pruner.needs_hessian,
                                           keep_outputs=not sequential, hooks=hooks)
                if collector is not None:
                    collector.end_block(step, stats if wanda_stats else None)
            _store_levels(db, step, stats, pruner, config, [(o, level_pattern(config, grid, o)) for o in offsets])
            for st in stats.values():
                st.forget_derived()
            if sequential and acts is not None:
                _advance_pruned(db, step)
    marker.write_text(json.dumps({"key": key, "content": _db_fingerprint(model, fit, config, grid, with_compute=False),
                                  "levels": offsets}))
    db.pass1 = collector.result() if collector is not None else None
    return db


def _advance_pruned(db: LevelDatabase, step) -> None:
    """The block's outputs with its level 0 (the target, as a uniform prune) written in, kept as the
    stream's next inputs; the dense weights are put back."""
    dense = {ref.name: ref.weight_oi.detach().clone() for ref in step.linears}
    try:
        assemble_block(db, step.index, 0, step.linears)
        step.outputs = step.run()
    finally:
        for ref in step.linears:
            ref.write_(dense[ref.name])


def open_database(model, fit: torch.Tensor, config: PruneConfig, directory: Path) -> LevelDatabase:
    """The complete level database a search built in ``directory`` for this dense model, fit
    windows and options (the final model is assembled from it); an error if it is missing or stale."""
    grid = level_grid(config)
    marker = directory / "complete.json"
    content = _db_fingerprint(model, fit, config, grid, with_compute=False)
    if not marker.is_file() or json.loads(marker.read_text()).get("content") != content:
        raise RuntimeError(f"no complete level database for this model and calibration in {directory}: the "
                           "searched allocation cannot be assembled; remove that checkpoint directory and run "
                           "the prune again (without --resume)")
    return LevelDatabase(directory, grid, masks=config.method in MASK_PRUNERS)


def assemble_block(db: LevelDatabase, index: int, offset: int, linears) -> None:
    """Write block ``index``'s stored level ``offset`` into its (onloaded, dense) linears."""
    weights = db.weights(index, offset, {ref.name: ref.weight_oi.detach() for ref in linears})
    for ref in linears:
        ref.write_(weights[ref.name])


def top_up_zeros(ref, count: int) -> int:
    """Zero the smallest-magnitude nonzero weights of ``ref`` until ``count`` of them are zero (ties:
    lowest index first); returns how many it zeroed. The level database prunes floor(s * numel) per
    linear; the allocation's exact counts give some linears one weight more, so that the assembled
    model's achieved sparsity is the target, as a sequential prune's is. (Where s * numel falls
    within 1e-6 below an integer the database's count is already one above the exact count; that
    linear keeps it: at most one weight per linear, nothing is un-pruned.)"""
    weight = ref.weight_oi.detach()
    missing = count - int((weight == 0).sum())
    if missing <= 0:
        return 0
    flat = weight.abs().flatten().float()
    flat[flat == 0] = float("inf")
    threshold = torch.topk(flat, missing, largest=False).values.max()
    below = (flat < threshold).nonzero().flatten()
    chosen = torch.cat([below, (flat == threshold).nonzero().flatten()[: missing - below.numel()]])
    new = weight.flatten().clone()
    new[chosen] = 0
    ref.write_(new.view_as(weight))
    return missing


class Scorer:
    """Assembles candidates in the model (only the blocks that change) and scores them.

    **Prefix reuse.** A child differs from its parent in a few blocks; every block before the first
    one that differs sees exactly the inputs it saw under the parent. With ``anchor`` set (the
    evolution sets it to the parent), the scorer keeps the anchor's block outputs per (window,
    length) and runs a candidate from its first differing block on, the earlier blocks answering
    with the kept outputs. Same inputs, same weights, same kernels: the fitness is bit-identical to
    a whole forward. The best candidate of each call is kept too, so an accepted child needs no
    extra forward to become the next anchor. Off when the kept outputs would exceed ``PREFIX_BYTES``.
    """

    def __init__(self, model, heldout: torch.Tensor, db: LevelDatabase, config: PruneConfig, device,
                 directory: Path) -> None:
        from .models import decoder_blocks, find_linears

        self.model, self.heldout, self.db, self.config, self.device = model, heldout, db, config, device
        self.blocks = decoder_blocks(model)
        self.refs = [find_linears(block) for block in self.blocks]
        self.dense = [{ref.name: ref.weight_oi.detach().clone() for ref in refs} for refs in self.refs]
        self.current: list[Optional[int]] = [None] * len(self.refs)  # None: dense
        self.anchor: Optional[list[int]] = None
        self._kept: dict[tuple[int, int], tuple[tuple, list]] = {}  # (window, length) -> (offsets, outputs)
        self._best: dict[tuple[int, int], tuple[tuple, list]] = {}  # the previous call's best candidate
        # block forwards computed (anchor forwards included) and asked for (candidates x windows x blocks)
        self.blocks_run = self.blocks_asked = 0
        self.dense_logprobs = None
        if config.search.fitness == "kl":
            self.dense_logprobs = self._dense_logprobs(directory / "dense_logprobs.bf16")

    def load(self, offsets: list[int]) -> None:
        for b, offset in enumerate(offsets):
            if self.current[b] == offset:
                continue
            weights = self.db.weights(b, offset, self.dense[b])
            for ref in self.refs[b]:
                ref.write_(weights[ref.name])
            self.current[b] = offset

    def restore(self) -> None:
        for b, refs in enumerate(self.refs):
            if self.current[b] is not None:
                for ref in refs:
                    ref.write_(self.dense[b][ref.name])
                self.current[b] = None

    def score(self, candidates: list[list[int]], windows: list[int], length: int) -> list[float]:
        reuse = False
        if self.anchor is not None:
            anchor = tuple(self.anchor)
            self._adopt(anchor)
            reuse = self._make_room(windows, length)
            if reuse:
                self._prepare(anchor, windows, length)
        out, best = [], None
        self.blocks_asked += len(candidates) * len(windows) * len(self.blocks)
        for candidate in candidates:
            self.load(candidate)
            if not reuse:
                out.append(self._fitness(windows, length))
                continue
            kept = [self._kept[(w, length)] for w in windows]
            recorded: list[list] = []
            out.append(self._fitness(windows, length, prefixes=[k[1] for k in kept],
                                     starts=[_first_difference(k[0], candidate) for k in kept], recorded=recorded))
            if best is None or out[-1] < best[0]:
                best = (out[-1], tuple(candidate), recorded)
        self._best = {} if best is None else {(w, length): (best[1], r) for w, r in zip(windows, best[2])}
        return out

    def forget_prefixes(self) -> None:
        """No anchor any more; the kept block outputs are released."""
        self.anchor, self._kept, self._best = None, {}, {}

    def _adopt(self, anchor: tuple) -> None:
        """Keep only the anchor's block outputs: those of earlier calls, and the last call's best
        candidate's when it is the anchor (an accepted child); the rest is released."""
        self._kept = {k: v for k, v in self._kept.items() if v[0] == anchor}
        for key, value in self._best.items():
            if value[0] == anchor and key not in self._kept:
                self._kept[key] = value
        self._best = {}

    def _kept_bytes(self) -> int:
        return sum(h.nbytes for _, outputs in self._kept.values() for h, _ in outputs)

    def _make_room(self, windows: list[int], length: int) -> bool:
        """Whether what is kept plus three allocations' block outputs on these windows (the anchor's,
        the candidate's, the best's) fit in PREFIX_BYTES, after releasing the oldest kept windows
        this call does not score; False (whole forwards) when even these windows alone do not fit."""
        width = self.model.get_input_embeddings().weight.shape[1]
        need = 3 * len(windows) * len(self.blocks) * length * width * 4
        wanted = {(w, length) for w in windows}
        used = self._kept_bytes()
        for key in [k for k in self._kept if k not in wanted]:  # oldest first
            if used + need <= PREFIX_BYTES:
                break
            used -= sum(h.nbytes for h, _ in self._kept.pop(key)[1])
        return used + need <= PREFIX_BYTES

    def _prepare(self, anchor: tuple, windows: list[int], length: int) -> None:
        """Keep the anchor's block outputs on these windows: kept from earlier, or by one forward."""
        missing = [w for w in windows if (w, length) not in self._kept]
        if missing:
            self.load(list(anchor))
            recorded: list[list] = []
            self._fitness(missing, length, prefixes=[None] * len(missing), starts=[0] * len(missing),
                          recorded=recorded)
            for w, r in zip(missing, recorded):
                self._kept[(w, length)] = (anchor, r)

    def _fitness(self, windows: list[int], length: int, prefixes=None, starts=None, recorded=None) -> float:
        """Mean next-token NLL (or KL to the dense model) on the windows' first ``length`` tokens. With
        ``prefixes``/``starts``, window i runs from block ``starts[i]`` on (the earlier blocks answer with
        ``prefixes[i]``, the kept outputs); every block's output is appended to ``recorded``."""
        from .strength import _finite, _nll_sum

        total, count = 0.0, 0
        with torch.no_grad():
            for i, w in enumerate(windows):
                ids = self.heldout[w : w + 1, :length].to(self.device)
                with contextlib.ExitStack() as stack:
                    if recorded is not None:
                        recorded.append(stack.enter_context(self._replayed(prefixes[i], starts[i])))
                    else:
                        self.blocks_run += len(self.blocks)
                    with compute.lowered(self.device):
                        logits = self.model(input_ids=ids, use_cache=False).logits[0].float()  # [T, V]
                if self.dense_logprobs is None:
                    total += float(_nll_sum(logits[None], ids))
                else:
                    ref = self.dense_logprobs[w, : length - 1].to(self.device, torch.float32)  # [T-1, V]
                    logq = torch.log_softmax(logits[:-1], dim=-1)
                    total += float((ref.exp() * (ref - logq)).sum())
                count += length - 1
        return _finite(total / count)

    @contextlib.contextmanager
    def _replayed(self, prefix: Optional[list], start: int):
        """Blocks before ``start`` return ``prefix``'s outputs instead of running; every block's output
        is collected (a clone) into the list this yields."""
        outputs: list = [None] * len(self.blocks)
        saved = {}

        def keep(b):
            def hook(module, args, output):
                if b < start:  # replayed: the kept output itself
                    outputs[b] = prefix[b]
                    return
                packed = isinstance(output, (tuple, list))
                hidden = output[0] if packed else output
                outputs[b] = (hidden.detach().clone(), (type(output), len(output)) if packed else None)
            return hook

        def replay(b):
            hidden, shape = prefix[b]  # shape: None (a bare tensor) or (tuple or list, length)

            def forward(*args, **kwargs):
                out = hidden.clone() if b == start - 1 else hidden  # the first real block gets its own copy
                return out if shape is None else shape[0]([out] + [None] * (shape[1] - 1))
            return forward

        handles = []
        try:
            for b, block in enumerate(self.blocks):
                if b < start:
                    saved[b] = block.__dict__.get("forward")
                    block.forward = replay(b)
                handles.append(block.register_forward_hook(keep(b)))
            self.blocks_run += len(self.blocks) - start
            yield outputs
        finally:
            for handle in handles:
                handle.remove()
            for b, previous in saved.items():
                if previous is None:
                    del self.blocks[b].forward
                else:
                    self.blocks[b].forward = previous

    def _dense_logprobs(self, path: Path) -> torch.Tensor:
        """The dense model's next-token log-probabilities on every held-out window, bf16 on disk."""
        windows, seq = self.heldout.shape
        vocab = self.model.get_output_embeddings().weight.shape[0]
        store = torch.from_file(str(path), shared=True, size=windows * (seq - 1) * vocab, dtype=torch.bfloat16)
        store = store.view(windows, seq - 1, vocab)
        with torch.no_grad():
            for w in range(windows):
                ids = self.heldout[w : w + 1].to(self.device)
                with compute.lowered(self.device):
                    logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                store[w] = torch.log_softmax(logits, dim=-1).to(torch.bfloat16).cpu()
        return store


def _warm_starts(model, config: PruneConfig, data: dict, grid: LevelGrid, sizes: list[int]) -> list[tuple[str, list[int]]]:
    """(name, quantised offsets) of every warm-start allocation; equal ones once (first name kept)."""
    from .allocate import allocate
    from .models import decoder_blocks

    candidates: list[tuple[str, PruneConfig]] = []
    block_als = dataclasses.replace(config.als, level="block", solver="graded")
    for name in config.search.warm_start:
        if name == "uniform":
            candidates.append(("uniform", dataclasses.replace(config, allocation="uniform")))
        elif name == "owl":
            candidates.append(("owl", dataclasses.replace(config, allocation="owl")))
        elif name == "als":
            for t in sorted(set(config.als.strength_grid) - {0.0}):
                candidates.append((f"als(strength={t:g})", dataclasses.replace(
                    config, allocation="als", als=dataclasses.replace(block_als, strength=float(t)))))
        elif name == "atp":
            from .allocation import atp_beta_grid

            for beta in atp_beta_grid(len(decoder_blocks(model)), config.sparsity, n=config.baselines.atp_grid):
                if float(beta) == 0.0:
                    continue
                candidates.append((f"atp(beta={float(beta):.4g})", dataclasses.replace(
                    config, allocation="atp", baselines=dataclasses.replace(config.baselines, atp_beta=float(beta)))))
    out, seen = [], set()
    for name, cfg in candidates:
        try:
            allocation = allocate(model, cfg, data, warn=False)
        except (ValueError, KeyError) as exc:  # an allocator that cannot run on this model/data
            log.warning("search: warm start %s skipped (%s)", name, exc)
            continue
        offsets = quantize(allocation.sparsity, sizes, grid)
        if tuple(offsets) not in seen:
            seen.add(tuple(offsets))
            out.append((name, offsets))
    return out


def run(model, calibration: torch.Tensor, config: PruneConfig, data: Optional[dict], device,
        state_dir: Optional[Path] = None, pass1=None) -> tuple[dict, dict, dict]:
    """The search: returns ({"sparsity": per block}, the record for the allocation diagnostics, the
    pass-1 data its warm starts used). ``data`` None: pass 1 (``pass1 = (config, needs)``) is
    collected here, on the level database's stream of the fit windows when it runs one."""
    from .allocate import make_units
    from .strength import split

    check_config(config, model)
    opts = config.search
    fit, heldout = split(calibration)
    seq_len = int(calibration.shape[1])
    stages, lengths = stages_of(config, seq_len, int(heldout.shape[0])), _lengths(config, seq_len)
    check_stages(opts.offspring, stages, int(heldout.shape[0]))
    grid = level_grid(config)
    units = make_units(model, "block")
    sizes = [u.size for u in units]
    groups = size_groups(sizes)
    budget = default_budget(calibration.shape[0]) if opts.budget is None else int(opts.budget)
    started = time.perf_counter()

    temporary = None
    if state_dir is None:
        temporary = Path(tempfile.mkdtemp(prefix="alsparse-search-"))
        work = temporary
    else:
        work = Path(state_dir)
    try:
        timings = {}
        t0 = time.perf_counter()
        db = build_database(model, fit, config, grid, device, work / DB_DIR, pass1=pass1 if data is None else None)
        timings["database_s"] = round(time.perf_counter() - t0, 2)
        if data is None:
            data = db.pass1
            if data is None:  # no stream ran (a database from disk, a pruner without calibration)
                from .api import _capture
                from .pass1 import collect

                t0 = time.perf_counter()
                data = collect(model, _capture(model, fit, device, config), device, pass1[0], pass1[1])
                timings["pass1_s"] = round(time.perf_counter() - t0, 2)
        scorer = Scorer(model, heldout, db, config, device, work)
        try:
            final = list(range(stages[-1].windows))
            t0 = time.perf_counter()
            warm = _warm_starts(model, config, data, grid, sizes)
            warm_scores = scorer.score([o for _, o in warm], final, lengths[-1])
            timings["warm_start_s"] = round(time.perf_counter() - t0, 2)
            best = min(range(len(warm)), key=lambda i: (warm_scores[i], i))
            for (name, _), score in zip(warm, warm_scores):
                log.info("search warm start %-22s fitness %.5f%s", name, score, "  <- start" if name == warm[best][0] else "")
            state = _load_state(state_dir)
            if state is None:
                state = EvolutionState(list(warm[best][1]), warm_scores[best])
            else:
                log.info("search: resuming at generation %d (%.1f window forwards spent)", state.generation, state.forwards)
            t0, blocks_before = time.perf_counter(), (scorer.blocks_run, scorer.blocks_asked)
            state = _evolve(state, scorer, groups, grid, config, stages, lengths, budget, heldout.shape[0], state_dir)
            timings["evolution_s"] = round(time.perf_counter() - t0, 2)
            evolution_blocks = (scorer.blocks_run - blocks_before[0], scorer.blocks_asked - blocks_before[1])
            t0 = time.perf_counter()
            chosen, check = _confirm(scorer, list(warm[best][1]), list(state.parent), int(heldout.shape[0]), lengths[-1])
            if check is not None:
                assembled_nll = check[check["kept"]]
            else:  # nothing to confirm: the chosen allocation on every held-out window, for the record
                assembled_nll = scorer.score([chosen], list(range(int(heldout.shape[0]))), lengths[-1])[0]
            timings["confirm_s"] = round(time.perf_counter() - t0, 2)
        finally:
            scorer.restore()
        if not is_balanced(chosen, groups):  # cannot happen: every step keeps it
            raise RuntimeError("the searched allocation lost its exact budget")
        sparsity = [grid.sparsity(j) for j in chosen]
        record = {
            "fitness": opts.fitness,
            "database": search_database(opts.database, config.method),
            "grid": {"step": grid.step, "span": grid.span, "levels": [grid.sparsity(j) for j in grid.offsets()],
                     "pattern": str(config.parsed_pattern)},
            "budget_window_forwards": budget,
            "offspring": opts.offspring,
            "stages": [{"survivors": s.survivors, "windows": s.windows, "tokens": t} for s, t in zip(stages, lengths)],
            "fit_windows": int(fit.shape[0]),
            "heldout_windows": int(heldout.shape[0]),
            "warm_starts": [{"name": n, "fitness": s, "sparsity": [grid.sparsity(j) for j in o]}
                            for (n, o), s in zip(warm, warm_scores)],
            "start": warm[best][0],
            "start_fitness": warm_scores[best],
            "final_fitness": state.parent_score,
            "generations": state.generation,
            "window_forwards": state.forwards,
            # blocks the evolution ran against what whole forwards of its candidates would have (prefix reuse)
            "evolution_block_fraction": round(evolution_blocks[0] / max(1, evolution_blocks[1]), 4),
            "trace": state.trace,
            "confirm": check,
            "offsets": chosen,
            # how the engine makes the final model from it (the api adds final_heldout_nll)
            "final": search_final(opts.final, config.method),
            # the chosen allocation assembled from the database on every held-out window, in the fitness's unit
            # (with the loss fitness: the assembled model's final_heldout_nll, to compare with a sequential one)
            "assembled_heldout_fitness": assembled_nll,
            "seconds": {**timings, "total_s": round(time.perf_counter() - started, 2)},
        }
        log.info("search: %d generations, fitness %.5f (start %s %.5f)", state.generation, state.parent_score,
                 warm[best][0], warm_scores[best])
        return {"sparsity": sparsity}, {"search": record}, data
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _confirm(scorer: Scorer, start: list[int], final: list[int], heldout_windows: int, length: int):
    """The evolution's parent against its start on *every* held-out window (each generation saw only a
    sample of them): the better of the two is the result, so it is never worse than the best warm
    start on the whole held-out calibration set. Returns (offsets, record or None when they are equal)."""
    if final == start:
        return final, None
    windows = list(range(heldout_windows))
    start_fit, final_fit = scorer.score([start, final], windows, length)
    kept = "final" if final_fit <= start_fit else "start"
    if kept == "start":
        log.warning("search: the evolved allocation (%.5f) is worse than its start (%.5f) on all %d held-out "
                    "windows; the start is kept", final_fit, start_fit, len(windows))
    return (final if kept == "final" else start), {"windows": len(windows), "tokens": length, "start": start_fit,
                                                      "final": final_fit, "kept": kept}


def _evolve(state, scorer: Scorer, groups, grid, config, stages, lengths, budget, heldout_windows, state_dir):
    from tqdm.auto import tqdm

    per_generation = generation_cost(config.search.offspring, stages)
    total = int(budget // per_generation) if per_generation else 0
    bar = tqdm(total=total, initial=min(state.generation, total), desc="search", unit="gen", leave=False)
    def fitness(candidates, windows, stage):
        scorer.anchor = list(state.parent)  # the children differ from it in a few blocks: reuse its prefix
        return scorer.score(candidates, windows, lengths[stage])

    def on_generation(s: EvolutionState) -> None:
        bar.update(1)
        bar.set_postfix(best=f"{s.parent_score:.4f}")
        if state_dir is not None:
            _save_state(Path(state_dir), s)

    try:
        return evolve(state, fitness, groups, grid, offspring=config.search.offspring, stages=stages, budget=budget,
                      seed=config.seed, max_flips=config.search.max_flips,
                      windows_for=lambda rng, n: sorted(rng.sample(range(heldout_windows), n)),
                      on_generation=on_generation)
    finally:
        bar.close()
        scorer.forget_prefixes()


def _save_state(directory: Path, state: EvolutionState) -> None:
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict()))
    tmp.replace(path)


def _load_state(directory: Optional[Path]) -> Optional[EvolutionState]:
    if directory is None or not (Path(directory) / STATE_FILE).is_file():
        return None
    return EvolutionState.from_dict(json.loads((Path(directory) / STATE_FILE).read_text()))
