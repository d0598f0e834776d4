"""The ALS linear program over densities d = 1 - s:

    maximize   sum_i c_i d_i
    subject to sum_i n_i d_i = (1 - S) sum_i n_i,      1 - s_hi_i <= d_i <= 1 - s_lo_i

Sizes are normalised to p_i = n_i / sum n before solving (the budget becomes sum p_i d_i = 1 - S).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alsparse.allocation._common import as_sizes, as_vector, check_target
from alsparse.registry import Registry

LP_METHODS: Registry = Registry("LP method")
_FEASIBILITY_TOL = 1e-12


@dataclass
class LPSolution:
    """Solver output: per-unit sparsity ``[L]`` float64, objective sum c_i d_i, status, iterations."""

    sparsity: torch.Tensor  # [L] float64
    objective: float
    status: str
    iterations: int
    method: str


def check_problem(c, sizes, target, s_lo, s_hi) -> tuple[torch.Tensor, ...]:
    """Validated float64 (c, p = n / sum n, d_lo, d_hi, density budget); ValueError if infeasible."""
    target = check_target(target)
    sizes = as_sizes(sizes)
    length = sizes.numel()
    c = as_vector(c, "c", length)
    s_lo, s_hi = as_vector(s_lo, "s_lo", length), as_vector(s_hi, "s_hi", length)
    if bool((s_lo > s_hi).any()) or bool((s_lo < 0).any()) or bool((s_hi >= 1).any()):
        raise ValueError(
            f"bounds must satisfy 0 <= s_lo <= s_hi < 1, got s_lo={s_lo.tolist()}, s_hi={s_hi.tolist()}"
        )
    weights = sizes / sizes.sum()  # [L]
    lowest, highest = float(torch.sum(weights * s_lo)), float(torch.sum(weights * s_hi))
    if not lowest - _FEASIBILITY_TOL <= target <= highest + _FEASIBILITY_TOL:
        raise ValueError(
            f"target sparsity {target} is infeasible: the bounds allow a size-weighted mean sparsity "
            f"in [{lowest:.6g}, {highest:.6g}] (s_lo={s_lo.tolist()}, s_hi={s_hi.tolist()})"
        )
    return c, weights, 1.0 - s_hi, 1.0 - s_lo, 1.0 - target


def largest_remainder(wanted: list[float], caps: list[int]) -> list[int]:
    """Integers k_i with floor(w_i) <= k_i <= min(ceil(w_i), cap_i) and sum k_i = round(sum w_i):
    the remainder goes one each to the largest fractional parts (ties: lowest index)."""
    exact = np.asarray(wanted, dtype=np.float64)
    base = np.floor(exact + 1e-9)
    fraction = np.where(base > exact, 0.0, exact - base)
    counts = base.astype(np.int64)
    remainder = int(round(float(exact.sum()) - float(base.sum())))
    for i in np.argsort(-fraction, kind="stable")[: max(remainder, 0)].tolist():
        if counts[i] < caps[i]:
            counts[i] += 1
    return [int(k) for k in counts]


def _solution(c, density, d_lo, d_hi, status, iterations, method) -> LPSolution:
    density = torch.minimum(torch.maximum(density, d_lo), d_hi)  # [L]
    objective = float(torch.sum(c * density))
    return LPSolution(1.0 - density, objective, status, int(iterations), method)


@LP_METHODS.register("closed_form")
def _closed_form(c, weights, d_lo, d_hi, budget) -> LPSolution:
    """Fractional knapsack: start every unit at d_lo, then raise units to d_hi in decreasing c_i/p_i
    (ties by index) until the budget is spent; at most one unit ends in between."""
    density = d_lo.clone()  # [L]
    remaining = budget - float(torch.sum(weights * d_lo))
    order = np.argsort(-(c / weights).numpy(), kind="stable")
    steps = 0
    for unit in order.tolist():
        if remaining <= 0.0:
            break
        room = float(weights[unit] * (d_hi[unit] - d_lo[unit]))
        take = min(room, remaining)
        density[unit] = d_hi[unit] if take == room else d_lo[unit] + take / weights[unit]
        remaining -= take
        steps += 1
    return _solution(c, density, d_lo, d_hi, "optimal", steps, "closed_form")


@LP_METHODS.register("highs")
def _highs(c, weights, d_lo, d_hi, budget) -> LPSolution:
    """scipy.optimize.linprog(method="highs") on the same problem (minimises -c.d)."""
    from scipy.optimize import linprog  # imported here: scipy costs ~40 MiB of RSS, needed only by ALS

    result = linprog(
        -c.numpy(),
        A_eq=weights.numpy()[None, :],
        b_eq=np.array([budget]),
        bounds=np.stack([d_lo.numpy(), d_hi.numpy()], axis=1),
        method="highs",
    )
    if result.status != 0:
        raise ValueError(f"HiGHS did not solve the allocation LP: {result.message}")
    density = torch.as_tensor(result.x, dtype=torch.float64)
    return _solution(c, density, d_lo, d_hi, "optimal", result.nit, "highs")


def solve_lp(c, sizes, target: float, s_lo, s_hi, method: str = "highs") -> LPSolution:
    """Maximise sum c_i d_i under the size budget and the sparsity bounds; returns s = 1 - d."""
    solver = LP_METHODS.get(method)
    return solver(*check_problem(c, sizes, target, s_lo, s_hi))
