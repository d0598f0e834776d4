"""ALS allocation: redundancy Psi -> importance w -> suffix means c -> LP (QP, graded) -> sparsity.

    rho_i = sum_j Psi_ij - 1,   mu_i = (1/L) sum_j Psi_ij
    w_i   = exp(-rho_i / mu_i)  ("modified", default)   or   exp(-rho_i)  ("original")
    w    <- w / max(w)          (Weight-Norm, computed in log space)
    c_i   = mean(w_i, ..., w_L)
"""

from __future__ import annotations

import torch

from alsparse.allocation._common import MAX_SPARSITY, as_sizes, as_vector, check_target, weighted_mean
from alsparse.allocation.graded import solve_graded
from alsparse.allocation.lp import LPSolution, solve_lp
from alsparse.allocation.qp import solve_qp
from alsparse.allocation.result import AllocationResult
from alsparse.allocation.rounding import round_to_granularity

EXPRESSIONS = ("modified", "original")
BOUNDS_MODES = ("relative", "absolute")
SOLVERS = ("lp", "qp", "graded")


def importance(
    psi: torch.Tensor, expression: str = "modified"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho, mu, w) of the redundancy matrix ``[L, L]``, each ``[L]`` float64, w normalised to max 1."""
    if expression not in EXPRESSIONS:
        raise ValueError(f"unknown expression {expression!r}; choose one of: {', '.join(EXPRESSIONS)}")
    psi = torch.as_tensor(psi, dtype=torch.float64).detach().cpu()  # [L, L]
    if psi.dim() != 2 or psi.shape[0] != psi.shape[1] or psi.shape[0] == 0:
        raise ValueError(f"psi must be a square [L, L] matrix, got shape {tuple(psi.shape)}")
    if not bool(torch.isfinite(psi).all()):
        raise ValueError("psi contains NaN or inf")
    rho = psi.sum(dim=1) - 1.0  # [L]
    mu = psi.mean(dim=1)  # [L]
    if bool((mu <= 0).any()):
        raise ValueError(f"psi row means must be positive (unit diagonal), got mu={mu.tolist()}")
    log_w = -rho / mu if expression == "modified" else -rho  # [L]
    w = torch.exp(log_w - log_w.max())  # [L], max exactly 1
    return rho, mu, w


def suffix_mean(w: torch.Tensor) -> torch.Tensor:
    """c_i = mean(w_i, ..., w_L) ``[L]``."""
    w = as_vector(w, "w")
    suffix_sums = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0])  # [L]
    counts = torch.arange(w.numel(), 0, -1, dtype=torch.float64)  # L, L-1, ..., 1
    return suffix_sums / counts


def bounds(target: float, L: int, delta: float = 0.2, mode: str = "relative", lo=None, hi=None):
    """(s_lo, s_hi) ``[L]`` float64. relative: [S - delta, S + delta] clipped to [0, 0.99];
    absolute: the given lo/hi (scalars or ``[L]``), which must satisfy 0 <= lo <= S <= hi < 1."""
    target = check_target(target)
    if mode == "relative":
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        s_lo = torch.full((L,), max(target - delta, 0.0), dtype=torch.float64)
        s_hi = torch.full((L,), min(target + delta, MAX_SPARSITY), dtype=torch.float64)
        return s_lo, s_hi
    if mode != "absolute":
        raise ValueError(f"unknown bounds mode {mode!r}; choose one of: {', '.join(BOUNDS_MODES)}")
    if lo is None or hi is None:
        raise ValueError("bounds mode 'absolute' needs both lo and hi")
    s_lo = torch.broadcast_to(torch.as_tensor(lo, dtype=torch.float64), (L,)).clone()
    s_hi = torch.broadcast_to(torch.as_tensor(hi, dtype=torch.float64), (L,)).clone()
    if bool((s_lo < 0).any()) or bool((s_hi >= 1).any()) or bool((s_lo > s_hi).any()):
        raise ValueError(
            f"absolute bounds must satisfy 0 <= lo <= hi < 1, got lo={s_lo.tolist()}, hi={s_hi.tolist()}"
        )
    return s_lo, s_hi


def _solve(c, sizes, target, s_lo, s_hi, solver, lp_method, qp_lambda, strength) -> LPSolution:
    if solver == "graded":
        if strength is None:
            raise ValueError("the graded ALS solver needs a strength (the sparsity spread, e.g. 0.1); "
                             "alsparse.strength chooses it on held-out calibration windows")
        return solve_graded(c, sizes, target, s_lo, s_hi, strength)
    if solver == "lp":
        return solve_lp(c, sizes, target, s_lo, s_hi, method=lp_method)
    if solver == "qp":
        return solve_qp(c, sizes, target, s_lo, s_hi, lam=qp_lambda)
    raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")


def als_allocate(
    psi: torch.Tensor,
    sizes,
    target: float,
    *,
    delta: float = 0.2,
    bounds_mode: str = "relative",
    lo=None,
    hi=None,
    expression: str = "modified",
    solver: str = "lp",
    lp_method: str = "highs",
    granularity: float | None = None,
    qp_lambda: float = 8.0,
    strength: float | None = None,
) -> AllocationResult:
    """Per-unit sparsity ``[L]`` from the redundancy matrix ``[L, L]``: less redundant -> less sparse."""
    rho, mu, w = importance(psi, expression)
    length = rho.numel()
    sizes = as_sizes(sizes, length)
    c = suffix_mean(w)
    s_lo, s_hi = bounds(target, length, delta, bounds_mode, lo, hi)
    solution = _solve(c, sizes, target, s_lo, s_hi, solver, lp_method, qp_lambda, strength)
    sparsity = solution.sparsity
    if granularity is not None:
        sparsity = round_to_granularity(sparsity, sizes, target, granularity, s_lo, s_hi)
    diagnostics = {
        "allocator": "als",
        "target": float(target),
        "mean_sparsity": weighted_mean(sparsity, sizes),
        "rho": rho.tolist(),
        "mu": mu.tolist(),
        "w": w.tolist(),
        "c": c.tolist(),
        "s_lo": s_lo.tolist(),
        "s_hi": s_hi.tolist(),
        "expression": expression,
        "solver": solver,
        "method": solution.method,
        "status": solution.status,
        "objective": solution.objective,
        "iterations": solution.iterations,
        "granularity": granularity,
    }
    if solver == "graded":
        diagnostics["strength"] = float(strength)
    return AllocationResult(sparsity=sparsity, diagnostics=diagnostics)
