"""Pass 1: one dense stream over the blocks, collecting what the allocator declared it needs.

"features": fixed-size RM summaries per unit (blocks and/or linears), never raw activations.
"wanda": per block, the OWL outlier ratio and the mean Wanda score of all its linears.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from .allocation.owl import outlier_ratio
from . import distributed
from .capture import Activations, stream_blocks
from .capture import chain_hooks as _chain
from .config import PruneConfig
from .pruning import InputStats
from .pruning import functional as F
from .redundancy.metric import redundancy_matrix
from .redundancy.summary import FeatureSummary, select_tokens

log = logging.getLogger(__name__)


def cache_key(config: PruneConfig, needs: frozenset, calibration_fingerprint: str) -> str:
    """What pass 1's result depends on, for one model: reuse it across sparsities and pruners."""
    parts: dict[str, Any] = {
        "needs": sorted(needs),
        "calibration": calibration_fingerprint,
        "batch_size": config.batch_size,
        "device": str(config.device),
    }
    if "features" in needs:
        als = config.als
        parts.update(level=_level(config), feature=als.feature, normalize=als.normalize, tokens=als.tokens,
                     windows=als.windows, seed=config.seed)
    if "wanda" in needs:
        parts["owl_m"] = config.baselines.owl_m
    return json.dumps(parts, sort_keys=True)


def _level(config: PruneConfig) -> str:
    return config.als.level if config.allocation == "als" else "block"


def collect(model, acts: Activations, device, config: PruneConfig, needs: frozenset) -> dict[str, Any]:
    if needs == frozenset({"features"}):
        acts = acts.head(config.als.windows)  # RM needs few sequences; Wanda statistics use them all
    collector = Collector(acts, device, config, needs)
    for step in stream_blocks(model, acts, device, desc="pass 1 (dense statistics)"):
        hooks = collector.start_block(step)
        step.outputs = step.run(hooks)
        collector.end_block(step)
    return collector.result()


class Collector:
    """Pass 1's work on one dense stream, block by block, whoever drives the stream: ``hooks =
    start_block(step)`` before the block runs (its linears' hooks), ``end_block(step, stats)`` after
    (``stats``: the stream's own Wanda statistics of the same inputs, when it keeps them, else the
    collector's), then ``result()``. The searched allocation drives it from its level database's
    stream, so the dense blocks run once for both."""

    def __init__(self, acts: Activations, device, config: PruneConfig, needs: frozenset) -> None:
        als = config.als
        self.acts, self.device, self.config, self.needs = acts, device, config, needs
        self.level = _level(config)
        self.token_index = None
        if "features" in needs:  # the RM's rows: from the first `windows` windows, whatever else pass 1 reads
            self.token_index = select_tokens(acts.head(als.windows).total_tokens, als.tokens, config.seed)
        self.block_features = "features" in needs and self.level in ("block", "component")
        self.parallel = distributed.world_size() > 1
        self.block_summaries: list[FeatureSummary] = []
        self.linear_summaries: list[FeatureSummary] = []  # joint: every linear of every block
        self.component_psis: list[torch.Tensor] = []  # two-stage: one [K, K] per block
        self.lod: list[float] = []
        self.mean_scores: list[float] = []
        self._per_linear: dict[str, FeatureSummary] = {}
        self._stats: dict[str, InputStats] = {}

    def start_block(self, step, own_stats: bool = True) -> dict:
        """The hooks to run ``step``'s block with (and its input summary, taken now: the run may
        overwrite the inputs). ``own_stats=False``: the caller keeps Wanda statistics of its own."""
        als, hooks = self.config.als, {}
        self._per_linear, self._stats = {}, {}
        if "features" in self.needs and self.level in ("component", "joint"):
            self._per_linear = {ref.name: FeatureSummary(self.token_index, als.normalize) for ref in step.linears}
            hooks.update(_feature_hooks(self._per_linear, als.feature_for("linear"), self.acts))
        if "wanda" in self.needs and own_stats:
            self._stats = {ref.name: InputStats(ref.in_features, self.device, norms=True, hessian=False)
                           for ref in step.linears}
            for name, s in self._stats.items():
                hooks[name] = _chain(hooks.get(name), lambda x, y, s=s: s.update(x))
        if self.block_features and als.feature_for("block") == "input":
            self.block_summaries.append(_summarise(step.inputs.hidden, self.token_index, als.normalize, self.acts))
        return hooks

    def end_block(self, step, stats: dict | None = None) -> None:
        """After the block ran (``step.outputs`` set). ``stats``: per linear name, the stream's Wanda
        statistics (already summed over processes), when ``start_block`` was told not to keep its own."""
        als = self.config.als
        if self.block_features and als.feature_for("block") == "output":
            self.block_summaries.append(_summarise(step.outputs, self.token_index, als.normalize, self.acts))
        if self.parallel:  # every process holds its own rows / sums: add them up, in a fixed order
            if self.block_features:
                self.block_summaries[-1].reduce_(distributed.all_reduce_)
            for ref in step.linears:
                if ref.name in self._per_linear:
                    self._per_linear[ref.name].reduce_(distributed.all_reduce_)
                if ref.name in self._stats:
                    self._stats[ref.name].reduce_(distributed.all_reduce_)
        if self.block_features:
            self.block_summaries[-1].finalize()
        if self._per_linear:
            finished = [self._per_linear[ref.name] for ref in step.linears]
            for summary in finished:
                summary.finalize()
            if self.level == "component":
                self.component_psis.append(redundancy_matrix(finished))
            else:
                self.linear_summaries.extend(finished)
        if "wanda" in self.needs:
            norms = self._stats if stats is None else stats
            scores = [F.wanda_scores(ref.weight_oi.float(), norms[ref.name].sq_norms) for ref in step.linears]
            self.lod.append(outlier_ratio(scores, self.config.baselines.owl_m))
            self.mean_scores.append(float(torch.cat([s.flatten() for s in scores]).mean()))
        self._per_linear, self._stats = {}, {}

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if "features" in self.needs:
            if self.block_summaries:
                data["block_psi"] = redundancy_matrix(self.block_summaries)
            if self.component_psis:
                data["component_psis"] = self.component_psis
            if self.linear_summaries:
                data["linear_psi"] = redundancy_matrix(self.linear_summaries)
            data["rm_tokens"] = int(self.token_index.numel())
            data["rm_windows"] = self.acts.head(self.config.als.windows).total_windows  # the RM rows' windows
        if "wanda" in self.needs:
            data["lod"] = torch.tensor(self.lod, dtype=torch.float64)
            data["mean_scores"] = torch.tensor(self.mean_scores, dtype=torch.float64)
        return data


def _feature_hooks(summaries: dict[str, FeatureSummary], side: str, acts: Activations):
    calls = {name: 0 for name in summaries}

    def make(name):
        def hook(x, y):  # called once per micro-batch, in order; [B, T, D] or [B*T, D] (OPT)
            summaries[name].update(x if side == "input" else y, acts.token_offset(calls[name]))
            calls[name] += 1

        return hook

    return {name: make(name) for name in summaries}


def _summarise(hidden: list[torch.Tensor], token_index, normalize: str, acts: Activations) -> FeatureSummary:
    """The kept rows of a block's hidden states (not yet finalized: processes may add theirs)."""
    summary = FeatureSummary(token_index, normalize)
    for j, h in enumerate(hidden):  # [B, T, D] per micro-batch
        summary.update(h, acts.token_offset(j))
    return summary
