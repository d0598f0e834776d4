"""Pruners behind a registry: each scores one weight matrix and returns the pruned copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import Pattern
from ..registry import Registry
from . import functional as F
from .stats import InputStats


@dataclass(frozen=True)
class Pruner:
    """``needs_norms``/``needs_hessian``: which input statistics the pruner reads."""

    name: str
    needs_norms: bool = False
    needs_hessian: bool = False
    description: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.needs_norms or self.needs_hessian

    def prune(self, weight, stats, sparsity, pattern, **options) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def prune_levels(self, weight, stats, levels, **options) -> Iterator[torch.Tensor]:
        """``prune`` at each ``(sparsity, pattern)`` of ``levels`` in turn, from the same weight and
        statistics (a level database); the same tensors as separate calls, one at a time."""
        for sparsity, pattern in levels:
            yield self.prune(weight, stats, sparsity, pattern, **options)


class _ScoreMasked(Pruner):
    """A pruner that zeroes the lowest entries of a score matrix: its masks at several levels share
    one score computation and one sort per comparison group."""

    per_row = False

    def scores(self, weight, stats) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def prune(self, weight, stats, sparsity, pattern, orders=None, **options):
        """``orders``: a dict the caller keeps for this one (unchanged) weight and its statistics
        across several prunes of it (a strength search's candidates): the sorts are done once."""
        return F.apply_prune_mask(weight, F.score_mask(self.scores(weight, stats), sparsity, pattern, self.per_row,
                                                       orders=orders))

    def prune_levels(self, weight, stats, levels, **options):
        scores, orders = self.scores(weight, stats), {}
        for sparsity, pattern in levels:
            yield F.apply_prune_mask(weight, F.score_mask(scores, sparsity, pattern, self.per_row, orders=orders))


PRUNERS: Registry[Pruner] = Registry("pruning method")


class Magnitude(_ScoreMasked):
    def scores(self, weight, stats):
        return F.magnitude_scores(weight.float())


class Wanda(_ScoreMasked):
    per_row = True

    def scores(self, weight, stats):
        return F.wanda_scores(weight.float(), stats.sq_norms)


class SparseGPT(Pruner):
    def prune(self, weight, stats, sparsity, pattern, blocksize=128, damp=0.01, **options):
        prepared = stats.derived(("sparsegpt_hessian", damp), lambda: F.prepare_hessian(stats.hessian, damp))
        return F.sparsegpt(weight, None, sparsity, pattern, blocksize=blocksize, damp=damp, prepared=prepared)


PRUNERS.register("magnitude")(Magnitude("magnitude", description="|W|, k lowest per matrix"))
PRUNERS.register("wanda")(Wanda("wanda", needs_norms=True, description="|W| * ||X||, k lowest per output row"))
PRUNERS.register("sparsegpt")(
    SparseGPT("sparsegpt", needs_hessian=True, description="OBS with damped Hessian, 128-column blocks")
)

__all__ = ["PRUNERS", "Pruner", "InputStats", "Pattern", "F"]
