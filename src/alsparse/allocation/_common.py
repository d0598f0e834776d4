"""Shared validation and the size-weighted mean helpers of the allocators (float64 throughout)."""

from __future__ import annotations

from typing import Sequence

import torch

# Upper clip of any allocated sparsity: [0, 1) is the allowed range, 0.99 keeps every unit non-empty.
MAX_SPARSITY = 0.99
MEAN_TOL = 1e-6  # contract: size-weighted mean == target within this


def as_vector(values: torch.Tensor | Sequence[float], name: str, length: int | None = None) -> torch.Tensor:
    """A 1-D float64 CPU tensor; checks finiteness and (optionally) the length."""
    vector = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()  # [L]
    if length is not None and vector.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {vector.numel()}")
    if vector.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{name} contains NaN or inf: {vector.tolist()}")
    return vector


def check_target(target: float) -> float:
    """The target sparsity S as a float in [0, MAX_SPARSITY]."""
    target = float(target)
    if not 0.0 <= target <= MAX_SPARSITY:
        raise ValueError(f"target sparsity must be in [0, {MAX_SPARSITY}], got {target}")
    return target


def as_sizes(sizes: torch.Tensor | Sequence[float], length: int | None = None) -> torch.Tensor:
    """Unit sizes n_i (prunable weights) as positive float64 ``[L]``."""
    sizes = as_vector(sizes, "sizes", length)
    if bool((sizes <= 0).any()):
        raise ValueError(f"sizes (prunable weights per unit) must be positive, got {sizes.tolist()}")
    return sizes


def weighted_mean(values: torch.Tensor, sizes: torch.Tensor) -> float:
    """sum_i n_i v_i / sum_i n_i."""
    return float(torch.sum(values * sizes) / torch.sum(sizes))


def minmax_scale(values: torch.Tensor, high: float) -> torch.Tensor:
    """(v - min) / (max - min) * high; all zeros when every value is equal."""
    span = values.max() - values.min()
    if float(span) <= 0.0:
        return torch.zeros_like(values)
    return (values - values.min()) / span * high


def shift_to_mean(
    sparsity: torch.Tensor, sizes: torch.Tensor, target: float, lo=0.0, hi=MAX_SPARSITY
) -> torch.Tensor:
    """clip(s + t, lo, hi) with the scalar t chosen (bisection, then an exact linear step on the
    unclipped units) so that the size-weighted mean is exactly ``target``. ``lo``/``hi``: scalars or
    per-unit ``[L]`` bounds. Order-preserving under scalar bounds; a pure shift when nothing is clipped."""
    lo_t = torch.as_tensor(lo, dtype=torch.float64).expand_as(sparsity)
    hi_t = torch.as_tensor(hi, dtype=torch.float64).expand_as(sparsity)
    weights = sizes / sizes.sum()  # [L]
    if not float(torch.sum(weights * lo_t)) - 1e-12 <= target <= float(torch.sum(weights * hi_t)) + 1e-12:
        raise ValueError(f"target {target} is outside the allowed sparsity range [{lo}, {hi}]")

    def mean_at(shift: float) -> float:
        return float(torch.sum(weights * torch.clamp(sparsity + shift, lo_t, hi_t)))

    low, high = float((lo_t - sparsity).min()), float((hi_t - sparsity).max())  # mean_at: lo .. hi
    for _ in range(200):
        middle = 0.5 * (low + high)
        if mean_at(middle) < target:
            low = middle
        else:
            high = middle
    shift = 0.5 * (low + high)
    free = ((sparsity + shift) > lo_t) & ((sparsity + shift) < hi_t)
    if bool(free.any()):
        shift += (target - mean_at(shift)) / float(weights[free].sum())
    return torch.clamp(sparsity + shift, lo_t, hi_t)
