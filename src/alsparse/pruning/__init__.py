"""Pruners behind a registry: each scores one weight matrix and returns the pruned copy."""

from __future__ import annotations

from dataclasses import dataclass

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


PRUNERS: Registry[Pruner] = Registry("pruning method")


class Magnitude(Pruner):
    def prune(self, weight, stats, sparsity, pattern, **options):
        scores = F.magnitude_scores(weight.float())
        return F.apply_prune_mask(weight, F.score_mask(scores, sparsity, pattern, per_row=False))


class Wanda(Pruner):
    def prune(self, weight, stats, sparsity, pattern, **options):
        scores = F.wanda_scores(weight.float(), stats.sq_norms)
        return F.apply_prune_mask(weight, F.score_mask(scores, sparsity, pattern, per_row=True))


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
