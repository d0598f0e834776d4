"""Sparsity allocation: pure functions from per-unit statistics to per-unit sparsity ``[L]``."""

from alsparse.allocation.alphapruning import alphapruning_allocate, esd_alpha, hill_alpha
from alsparse.allocation.als import als_allocate, bounds, importance, suffix_mean
from alsparse.allocation.atp import atp_allocate, atp_beta_grid
from alsparse.allocation.baselines import uniform
from alsparse.allocation.component import als_joint, als_two_stage
from alsparse.allocation.dlp import dlp_allocate
from alsparse.allocation.lp import LPSolution, solve_lp
from alsparse.allocation.nm import mixed_nm
from alsparse.allocation.owl import outlier_ratio, owl_allocate
from alsparse.allocation.qp import solve_qp
from alsparse.allocation.result import AllocationResult
from alsparse.allocation.rounding import round_to_granularity

__all__ = [
    "AllocationResult",
    "LPSolution",
    "alphapruning_allocate",
    "als_allocate",
    "als_joint",
    "als_two_stage",
    "atp_allocate",
    "atp_beta_grid",
    "bounds",
    "dlp_allocate",
    "esd_alpha",
    "hill_alpha",
    "importance",
    "mixed_nm",
    "outlier_ratio",
    "owl_allocate",
    "round_to_granularity",
    "solve_lp",
    "solve_qp",
    "suffix_mean",
    "uniform",
]
