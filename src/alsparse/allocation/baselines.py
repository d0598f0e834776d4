"""The uniform allocation: every unit gets the target sparsity."""

from __future__ import annotations

import torch

from alsparse.allocation._common import check_target


def uniform(L: int, target: float) -> torch.Tensor:
    """s_i = S for i = 0..L-1, ``[L]`` float64."""
    if L < 1:
        raise ValueError(f"number of units L must be >= 1, got {L}")
    return torch.full((L,), check_target(target), dtype=torch.float64)
