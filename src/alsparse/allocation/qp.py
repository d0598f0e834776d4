"""Smooth variant of the ALS program (the same authors' DSA code):

    maximize   sum_i c_i d_i - lam * sum_i (d_i - (1 - S))^2
    subject to sum_i n_i d_i = (1 - S) sum_i n_i,      1 - s_hi_i <= d_i <= 1 - s_lo_i

With p = n / sum n, KKT gives d_i(nu) = clip(1 - S + (c_i - nu p_i) / (2 lam), d_lo_i, d_hi_i); the
budget sum p_i d_i(nu) is non-increasing in the multiplier nu, found by bisection and then made
exact by one linear step on the unclipped units ("closed_form", default). "slsqp" solves the same
problem with scipy for cross-checking.
"""

from __future__ import annotations

import numpy as np
import torch

from alsparse.allocation.lp import LPSolution, check_problem
from alsparse.registry import Registry

QP_METHODS: Registry = Registry("QP method")


def _objective(c, density, center, lam) -> float:
    return float(torch.sum(c * density) - lam * torch.sum((density - center) ** 2))


@QP_METHODS.register("closed_form")
def _closed_form(c, weights, d_lo, d_hi, budget, lam) -> LPSolution:
    center = budget  # 1 - S

    def density_at(nu: float) -> torch.Tensor:  # [L]
        return torch.minimum(torch.maximum(center + (c - nu * weights) / (2 * lam), d_lo), d_hi)

    low = float(torch.min((c - 2 * lam * (d_hi - center)) / weights))  # every unit at d_hi
    high = float(torch.max((c - 2 * lam * (d_lo - center)) / weights))  # every unit at d_lo
    for _ in range(200):
        middle = 0.5 * (low + high)
        if float(torch.sum(weights * density_at(middle))) > budget:
            low = middle
        else:
            high = middle
    nu = 0.5 * (low + high)
    density = density_at(nu)
    free = (density > d_lo) & (density < d_hi)
    if bool(free.any()):
        slope = float(torch.sum(weights[free] ** 2)) / (2 * lam)
        nu += (float(torch.sum(weights * density)) - budget) / slope
        density = density_at(nu)
    return LPSolution(1.0 - density, _objective(c, density, center, lam), "optimal", 200, "qp_closed_form")


@QP_METHODS.register("slsqp")
def _slsqp(c, weights, d_lo, d_hi, budget, lam) -> LPSolution:
    c_np, w_np, center = c.numpy(), weights.numpy(), budget
    from scipy.optimize import minimize  # imported here: scipy costs ~40 MiB of RSS, needed only by ALS

    result = minimize(
        lambda d: -(c_np @ d) + lam * np.sum((d - center) ** 2),
        x0=np.clip(np.full_like(c_np, center), d_lo.numpy(), d_hi.numpy()),
        jac=lambda d: -c_np + 2 * lam * (d - center),
        bounds=np.stack([d_lo.numpy(), d_hi.numpy()], axis=1),
        constraints=[{"type": "eq", "fun": lambda d: w_np @ d - budget, "jac": lambda d: w_np}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    if not result.success:
        raise ValueError(f"SLSQP did not solve the allocation QP: {result.message}")
    density = torch.minimum(torch.maximum(torch.as_tensor(result.x, dtype=torch.float64), d_lo), d_hi)
    objective = _objective(c, density, center, lam)
    return LPSolution(1.0 - density, objective, "optimal", int(result.nit), "qp_slsqp")


def solve_qp(
    c, sizes, target: float, s_lo, s_hi, lam: float = 8.0, method: str = "closed_form"
) -> LPSolution:
    """Maximise sum c_i d_i - lam sum (d_i - (1-S))^2 under the LP's budget and bounds; s = 1 - d."""
    if not lam > 0:
        raise ValueError(f"qp lambda must be > 0 (lambda = 0 is the LP: use solve_lp), got {lam}")
    solver = QP_METHODS.get(method)
    return solver(*check_problem(c, sizes, target, s_lo, s_hi), float(lam))
