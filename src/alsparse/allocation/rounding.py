"""Round an allocation to a sparsity grid g while keeping the size-weighted mean exactly S.

1. Each s_i goes to the nearest multiple of g inside its bounds [s_lo_i, s_hi_i] (a unit whose
   bounds contain no multiple of g keeps its value).
2. Grid repair: the residual e = S - mean(r) is reduced by whole g-steps in the direction of e,
   visiting units by how far rounding moved them against that direction (stable by index), taking
   a step only if it shrinks |e| and stays in bounds.
3. Sub-grid correction: what is left (|e| <= max_i p_i g / 2, p = n / sum n) is put on the largest
   unit (ties: lowest index) as s_i += e / p_i, spilling to the next largest only if a bound stops
   it. So every s_i is a multiple of g except, normally, that one unit.
"""

from __future__ import annotations

import numpy as np
import torch

from alsparse.allocation._common import MAX_SPARSITY, as_sizes, as_vector, check_target

_GRID_TOL = 1e-9


def _bound(value, length: int, name: str, default: float) -> torch.Tensor:
    if value is None:
        return torch.full((length,), default, dtype=torch.float64)
    if isinstance(value, (int, float)):
        return torch.full((length,), float(value), dtype=torch.float64)
    return as_vector(value, name, length)


def _grid_repair(s, rounded, steps, k_lo, k_hi, weights, residual, g) -> float:
    """Move whole g-steps (in place) while they shrink |residual|; returns the new residual."""
    direction = 1.0 if residual > 0 else -1.0
    against = ((s - rounded) * direction).numpy()  # rounding moved the unit against the residual
    for unit in np.argsort(-against, kind="stable").tolist():
        new_step = steps[unit] + direction
        if not k_lo[unit] <= new_step <= k_hi[unit]:
            continue
        change = float(weights[unit]) * g * direction
        if abs(residual - change) < abs(residual):
            steps[unit] = new_step
            rounded[unit] = new_step * g
            residual -= change
    return residual


def _absorb(rounded, weights, residual, s_lo, s_hi) -> None:
    """Put the residual (in place) on the largest units first, within their bounds."""
    for unit in np.argsort(-weights.numpy(), kind="stable").tolist():
        if abs(residual) <= 1e-15:
            return
        wanted = residual / float(weights[unit])
        change = min(max(wanted, float(s_lo[unit] - rounded[unit])), float(s_hi[unit] - rounded[unit]))
        rounded[unit] += change
        residual -= change * float(weights[unit])


def round_to_granularity(s, sizes, target: float, g: float = 0.005, s_lo=None, s_hi=None) -> torch.Tensor:
    """Per-unit sparsity on the grid g (see module doc) with sum n_i s_i / sum n_i == target."""
    if not 0.0 < g < 1.0:
        raise ValueError(f"granularity g must be in (0, 1), got {g}")
    target = check_target(target)
    sizes = as_sizes(sizes)
    length = sizes.numel()
    s = as_vector(s, "s", length)
    s_lo, s_hi = _bound(s_lo, length, "s_lo", 0.0), _bound(s_hi, length, "s_hi", MAX_SPARSITY)
    weights = sizes / sizes.sum()  # [L]
    if not float(torch.sum(weights * s_lo)) - 1e-12 <= target <= float(torch.sum(weights * s_hi)) + 1e-12:
        raise ValueError(f"target {target} is outside the mean sparsity the bounds allow")
    k_lo = torch.ceil(s_lo / g - _GRID_TOL)  # [L] grid index range inside the bounds
    k_hi = torch.floor(s_hi / g + _GRID_TOL)
    on_grid = k_lo <= k_hi
    steps = torch.where(on_grid, torch.round(s / g).clamp(min=k_lo, max=k_hi), s / g)  # [L]
    rounded = torch.where(on_grid, steps * g, s)
    k_lo, k_hi = torch.where(on_grid, k_lo, steps), torch.where(on_grid, k_hi, steps)
    residual = target - float(torch.sum(weights * rounded))
    if residual != 0.0:
        residual = _grid_repair(s, rounded, steps, k_lo.tolist(), k_hi.tolist(), weights, residual, g)
    _absorb(rounded, weights, residual, s_lo, s_hi)
    return rounded
