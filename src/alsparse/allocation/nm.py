"""Non-uniform N:M (OWL style): M fixed, each unit gets its own n_i zeros per M.

x_i = M s_i + (N - M mean(s)) (shift so the ideal counts average to N), then largest-remainder
rounding with sizes: n_i = clip(floor x_i, 0, M - 1), and units are raised by one (largest
remainder first, ties by index) while that brings the size-weighted mean of n_i closer to N (lowered,
smallest remainder first, if the floors overshoot). Deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

from alsparse.allocation._common import as_sizes, as_vector


def mixed_nm(s, sizes, target_n: int, m: int) -> tuple[torch.Tensor, float]:
    """(n ``[L]`` int64 in [0, m - 1], achieved size-weighted mean of n_i / m); target = target_n / m."""
    if m < 2 or not 0 < target_n < m:
        raise ValueError(f"N:M needs m >= 2 and 0 < N < m, got N={target_n}, M={m}")
    sparsity = as_vector(s, "s")
    sizes = as_sizes(sizes, sparsity.numel())
    weights = sizes / sizes.sum()  # [L]
    ideal = m * sparsity + (target_n - m * float(torch.sum(weights * sparsity)))  # [L]
    # an ideal count within float error of an integer is that integer (a searched mix is exact N_i / M)
    counts = torch.where((ideal - ideal.round()).abs() < 1e-9, ideal.round(), ideal.floor()).clamp(0, m - 1)
    remainder = (ideal - counts).numpy()
    residual = target_n - float(torch.sum(weights * counts))  # in units of zeros per m
    direction = 1.0 if residual > 0 else -1.0
    order = np.argsort(-remainder if direction > 0 else remainder, kind="stable")
    for unit in order.tolist():
        moved = counts[unit] + direction
        if 0 <= moved <= m - 1 and abs(residual - direction * float(weights[unit])) < abs(residual):
            counts[unit] = moved
            residual -= direction * float(weights[unit])
    achieved = float(torch.sum(weights * counts)) / m
    return counts.long(), achieved
