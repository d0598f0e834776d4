"""Graded ALS: the size-weighted QP over min-max normalised importance (our reading of the
authors' smooth solver; ../shared/ALS_SPEC.md, "Solver and bounds").

    c_hat_i = (c_i - min c) / (max c - min c)                         (0 when c is constant)
    maximise   sum_i n_i c_hat_i d_i - 1/(2t) sum_i n_i (d_i - (1 - S))^2
    subject to sum_i n_i d_i = (1 - S) sum_i n_i,   1 - s_hi_i <= d_i <= 1 - s_lo_i

KKT gives s_i = clip(S - t (c_hat_i - nu), s_lo_i, s_hi_i) with the scalar nu that meets the budget:
sparsity is linear in importance, the most important unit sits t below the least important one
(before clipping), and a unit's size never moves its ratio (weighting both terms by n_i keeps the
solution size-free, which matters at component level where MLP matrices are larger). The strength
t is the sparsity spread: t = 0 is uniform exactly; it is chosen on held-out calibration loss
(alsparse.strength).
"""

from __future__ import annotations

import torch

from alsparse.allocation._common import as_vector, minmax_scale, shift_to_mean
from alsparse.allocation.lp import LPSolution, check_problem


def normalised_importance(c) -> torch.Tensor:
    """c min-max scaled to [0, 1] ``[L]`` (all zeros when every c_i is equal)."""
    return minmax_scale(as_vector(c, "c"), 1.0)


def solve_graded(c, sizes, target: float, s_lo, s_hi, strength: float) -> LPSolution:
    """Per-unit sparsity ``[L]``: S - strength * (c_hat - nu), clipped to the bounds, exact mean S."""
    if not strength >= 0:
        raise ValueError(f"graded ALS strength must be >= 0, got {strength}")
    c, weights, d_lo, d_hi, budget = check_problem(c, sizes, target, s_lo, s_hi)
    s_lo, s_hi, target = 1.0 - d_hi, 1.0 - d_lo, 1.0 - budget
    c_hat = normalised_importance(c)  # [L]
    flat = strength == 0 or float(c_hat.max()) == 0.0
    if flat and bool(((s_lo <= target) & (target <= s_hi)).all()):
        return _solution(c_hat, torch.full_like(c_hat, target), strength, target, weights, 0)  # uniform, exactly
    sparsity = shift_to_mean(target - strength * c_hat, weights, target, s_lo, s_hi)  # the multiplier nu
    return _solution(c_hat, sparsity, strength, target, weights, 200)


def _solution(c_hat, sparsity, strength, target, weights, steps) -> LPSolution:
    density = 1.0 - sparsity
    center = 1.0 - target
    penalty = float(torch.sum(weights * (density - center) ** 2)) / (2 * strength) if strength > 0 else 0.0
    objective = float(torch.sum(weights * c_hat * density)) - penalty
    return LPSolution(sparsity, objective, "optimal", steps, "graded_closed_form")
