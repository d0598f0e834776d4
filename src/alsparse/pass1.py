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
    als = config.als
    level = _level(config)
    if needs == frozenset({"features"}):
        acts = acts.head(als.windows)  # RM needs few sequences; Wanda statistics use them all
    token_index = None
    if "features" in needs:  # the RM's rows: from the first `windows` windows, whatever else pass 1 reads
        token_index = select_tokens(acts.head(als.windows).total_tokens, als.tokens, config.seed)
    parallel = distributed.world_size() > 1
    block_summaries: list[FeatureSummary] = []
    linear_summaries: list[FeatureSummary] = []  # joint: every linear of every block
    component_psis: list[torch.Tensor] = []  # two-stage: one [K, K] per block
    lod, mean_scores = [], []
    for step in stream_blocks(model, acts, device, desc="pass 1 (dense statistics)"):
        hooks, per_linear, stats = {}, {}, {}
        if "features" in needs and level in ("component", "joint"):
            per_linear = {ref.name: FeatureSummary(token_index, als.normalize) for ref in step.linears}
            hooks.update(_feature_hooks(per_linear, als.feature_for("linear"), acts))
        if "wanda" in needs:
            stats = {ref.name: InputStats(ref.in_features, device, norms=True, hessian=False) for ref in step.linears}
            for name, s in stats.items():
                hooks[name] = _chain(hooks.get(name), lambda x, y, s=s: s.update(x))
        block_features = "features" in needs and level in ("block", "component")
        if block_features and als.feature_for("block") == "input":  # before the run may overwrite them
            block_summaries.append(_summarise(step.inputs.hidden, token_index, als.normalize, acts))
        step.outputs = step.run(hooks)
        if block_features and als.feature_for("block") == "output":
            block_summaries.append(_summarise(step.outputs, token_index, als.normalize, acts))
        if parallel:  # every process holds its own rows / sums: add them up, in a fixed order
            if block_features:
                block_summaries[-1].reduce_(distributed.all_reduce_)
            for ref in step.linears:
                if ref.name in per_linear:
                    per_linear[ref.name].reduce_(distributed.all_reduce_)
                if ref.name in stats:
                    stats[ref.name].reduce_(distributed.all_reduce_)
        if block_features:
            block_summaries[-1].finalize()
        if per_linear:
            finished = [per_linear[ref.name] for ref in step.linears]
            for summary in finished:
                summary.finalize()
            if level == "component":
                component_psis.append(redundancy_matrix(finished))
            else:
                linear_summaries.extend(finished)
        if stats:
            scores = [F.wanda_scores(ref.weight_oi.float(), stats[ref.name].sq_norms) for ref in step.linears]
            lod.append(outlier_ratio(scores, config.baselines.owl_m))
            mean_scores.append(float(torch.cat([s.flatten() for s in scores]).mean()))
    data: dict[str, Any] = {}
    if "features" in needs:
        if block_summaries:
            data["block_psi"] = redundancy_matrix(block_summaries)
        if component_psis:
            data["component_psis"] = component_psis
        if linear_summaries:
            data["linear_psi"] = redundancy_matrix(linear_summaries)
        data["rm_tokens"] = int(token_index.numel())
        data["rm_windows"] = acts.head(als.windows).total_windows  # the windows the RM rows came from
    if "wanda" in needs:
        data["lod"] = torch.tensor(lod, dtype=torch.float64)
        data["mean_scores"] = torch.tensor(mean_scores, dtype=torch.float64)
    return data


def _feature_hooks(summaries: dict[str, FeatureSummary], side: str, acts: Activations):
    calls = {name: 0 for name in summaries}

    def make(name):
        def hook(x, y):  # called once per micro-batch, in order; [B, T, D] or [B*T, D] (OPT)
            summaries[name].update(x if side == "input" else y, acts.token_offset(calls[name]))
            calls[name] += 1

        return hook

    return {name: make(name) for name in summaries}


def _chain(first, second):
    if first is None:
        return second

    def both(x, y):
        first(x, y)
        second(x, y)

    return both


def _summarise(hidden: list[torch.Tensor], token_index, normalize: str, acts: Activations) -> FeatureSummary:
    """The kept rows of a block's hidden states (not yet finalized: processes may add theirs)."""
    summary = FeatureSummary(token_index, normalize)
    for j, h in enumerate(hidden):  # [B, T, D] per micro-batch
        summary.update(h, acts.token_offset(j))
    return summary
