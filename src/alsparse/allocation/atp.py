"""ATP (ICML 2025): sparsity increasing linearly with depth.

    s_i = S - beta (L - 1) / 2 + beta i,   i = 0..L-1

then shifted (spacing kept) so the size-weighted mean is exactly S. beta is chosen by the
orchestration layer (held-out calibration loss) among ``atp_beta_grid``.
"""

from __future__ import annotations

import torch

from alsparse.allocation._common import MAX_SPARSITY, as_sizes, check_target, shift_to_mean


def atp_allocate(L: int, sizes, target: float, beta: float) -> torch.Tensor:
    """Per-block sparsity ``[L]`` float64, an arithmetic progression of step beta >= 0."""
    target = check_target(target)
    sizes = as_sizes(sizes, L)
    if beta < 0:
        raise ValueError(f"ATP beta must be >= 0 (sparsity increases with depth), got {beta}")
    depth = torch.arange(L, dtype=torch.float64)  # [L]
    sparsity = target - beta * (L - 1) / 2 + beta * depth
    return shift_to_mean(sparsity, sizes, target)


def atp_beta_grid(L: int, target: float, n: int = 11) -> torch.Tensor:
    """n evenly spaced betas from 0 (uniform) to the largest keeping every s_i in [0, 0.99] with
    equal sizes: beta_max = 2 min(S, 0.99 - S) / (L - 1). ``[n]`` float64; L = 1 gives [0]."""
    target = check_target(target)
    if L < 1 or n < 1:
        raise ValueError(f"need L >= 1 and n >= 1, got L={L}, n={n}")
    if L == 1:
        return torch.zeros(1, dtype=torch.float64)
    beta_max = 2 * min(target, MAX_SPARSITY - target) / (L - 1)
    return torch.linspace(0.0, beta_max, n, dtype=torch.float64)
