"""OWL (Yin et al., ICML 2024): outlier-weighed layerwise sparsity.

    LOD_i = fraction of block i's Wanda scores above m * mean (m = 5)
    D_i   = (LOD_i - min LOD) / (max LOD - min LOD) * 2 lam,  shifted to mean density 1 - S
    s_i   = 1 - D_i            (more outliers -> denser)

"mean" is size-weighted; a final clip to [0, 0.99] re-shifts so the mean stays exactly S.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alsparse.allocation._common import as_sizes, as_vector, check_target, minmax_scale, shift_to_mean


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of score entries strictly above m * mean(scores). A sequence of tensors (the
    block's linears) is treated as one concatenated tensor without concatenating it."""
    pieces = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not pieces or sum(piece.numel() for piece in pieces) == 0:
        raise ValueError("outlier_ratio needs a non-empty score tensor")
    count = sum(piece.numel() for piece in pieces)
    mean = sum(float(piece.sum(dtype=torch.float64)) for piece in pieces) / count
    above = sum(int((piece > m * mean).sum()) for piece in pieces)
    return above / count


def owl_allocate(lod, sizes, target: float, lam: float = 0.08) -> torch.Tensor:
    """Per-block sparsity ``[L]`` float64 from the layerwise outlier distribution ``[L]``."""
    target = check_target(target)
    lod = as_vector(lod, "lod")
    sizes = as_sizes(sizes, lod.numel())
    if lam < 0:
        raise ValueError(f"OWL lambda must be >= 0, got {lam}")
    density = minmax_scale(lod, 2 * lam)  # [L] in [0, 2 lam]
    return shift_to_mean(1.0 - density, sizes, target)
