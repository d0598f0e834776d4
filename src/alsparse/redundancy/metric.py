"""Redundancy Metric (RM) between units' feature matrices.

    RM(X_i, X_j) = ||X_i^T X_j||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F)
                 = <K_i, K_j>_F / (||K_i||_F ||K_j||_F),      K = X X^T

in [0, 1]; with column-centred features it is linear CKA. All arithmetic in float64.
A unit whose features are all zero (e.g. constant before centering) has no defined RM: we set
RM = 0 against every other unit (1 on the diagonal) and log a warning.
"""

from __future__ import annotations

import logging

import torch

from alsparse.redundancy.summary import FeatureSummary

logger = logging.getLogger(__name__)

_ZERO_NORM = 1e-300
_CHUNK_ELEMENTS = 1 << 24  # float64 elements of one Gram-space chunk [L, c m] (128 MiB)


def _check_pair(x_i: torch.Tensor, x_j: torch.Tensor) -> None:
    if x_i.dim() != 2 or x_j.dim() != 2 or x_i.shape[0] != x_j.shape[0]:
        raise ValueError(
            f"feature matrices must be [m, d_i] and [m, d_j] with the same rows m, "
            f"got {tuple(x_i.shape)} and {tuple(x_j.shape)}"
        )


def redundancy_metric(x_i: torch.Tensor, x_j: torch.Tensor) -> float:
    """RM of two feature matrices ``[m, d_i]``, ``[m, d_j]`` (used as given: no normalisation);
    computed in feature space (O(m d_i d_j)) or Gram space (O(m^2 (d_i + d_j))), whichever is
    cheaper. Returns 0.0 if either matrix is all zeros."""
    _check_pair(x_i, x_j)
    x_i, x_j = x_i.double(), x_j.double()
    m, d_i, d_j = x_i.shape[0], x_i.shape[1], x_j.shape[1]
    if m * d_i * d_j <= m * m * (d_i + d_j + 1):
        cross = torch.linalg.matrix_norm(x_i.T @ x_j) ** 2  # ||X_i^T X_j||^2
        norm_i = torch.linalg.matrix_norm(x_i.T @ x_i)  # [d_i, d_i] -> scalar
        norm_j = torch.linalg.matrix_norm(x_j.T @ x_j)
    else:
        k_i, k_j = x_i @ x_i.T, x_j @ x_j.T  # [m, m]
        cross = torch.sum(k_i * k_j)
        norm_i, norm_j = torch.linalg.matrix_norm(k_i), torch.linalg.matrix_norm(k_j)
    denominator = float(norm_i * norm_j)
    if denominator <= _ZERO_NORM:
        return 0.0
    return min(max(float(cross) / denominator, 0.0), 1.0)


def _use_gram_space(summaries: list[FeatureSummary]) -> bool:
    """Gram space if any unit is stored as a Gram, or if it is cheaper for the whole matrix:
    feature space costs sum_{i<j} m d_i d_j, Gram space sum_i m^2 d_i + L^2/2 m^2."""
    if any(s.kind == "gram" for s in summaries):
        return True
    m = summaries[0].num_tokens
    widths = torch.tensor([s.matrix.shape[1] for s in summaries], dtype=torch.float64)  # [L]
    pair_products = (widths.sum() ** 2 - (widths**2).sum()) / 2
    feature_cost = m * float(pair_products)
    gram_cost = m * m * float(widths.sum()) + len(summaries) ** 2 / 2 * m * m
    return gram_cost < feature_cost


def _check_summaries(summaries: list[FeatureSummary]) -> None:
    if not summaries:
        raise ValueError("redundancy_matrix needs at least one FeatureSummary")
    for position, summary in enumerate(summaries):
        if not summary.finalized:
            raise ValueError(f"summary {position} is not finalized; call finalize() first")
        if not torch.equal(summary.token_index, summaries[0].token_index):
            raise ValueError(
                f"summary {position} uses a different token_index from summary 0; every unit must be "
                "summarised over the same tokens (one select_tokens call)"
            )


def _feature_space_products(summaries: list[FeatureSummary]) -> torch.Tensor:
    """P_ij = ||X_i^T X_j||_F^2 ``[L, L]`` float64, pairwise. Products are formed in the stored
    precision (float32) and reduced in float64, so no float64 copy of every unit is held."""
    features = [summary.matrix for summary in summaries]  # L x [m, d_i]
    size = len(features)
    products = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(i, size):
            cross = (features[i].T @ features[j]).double()  # [d_i, d_j]
            products[i, j] = products[j, i] = float(torch.sum(cross * cross))
    return products


def _gram_space_products(summaries: list[FeatureSummary]) -> torch.Tensor:
    """P_ij = <K_i, K_j>_F ``[L, L]`` float64, accumulated over row chunks of the Grams: one
    float64 chunk ``[L, c m]`` (about 128 MiB) is held at a time; rows-stored units build their
    Gram rows on the fly in the stored precision."""
    size, m = len(summaries), summaries[0].num_tokens
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (size * m))
    device = summaries[0].matrix.device
    products = torch.zeros(size, size, dtype=torch.float64, device=device)
    for start in range(0, m, rows_per_chunk):
        stop = min(start + rows_per_chunk, m)
        block = torch.empty(size, (stop - start) * m, dtype=torch.float64, device=device)  # [L, c m]
        for unit, summary in enumerate(summaries):
            x = summary.matrix
            piece = x[start:stop] if summary.kind == "gram" else x[start:stop] @ x.T  # [c, m]
            block[unit] = piece.flatten()
        products += block @ block.T
    return products.cpu()


def redundancy_matrix(summaries: list[FeatureSummary]) -> torch.Tensor:
    """Psi ``[L, L]`` float64 = P_ij / sqrt(P_ii P_jj) with P the feature- or Gram-space products
    (whichever is cheaper); symmetric, unit diagonal, entries clipped to [0, 1]."""
    _check_summaries(summaries)
    if _use_gram_space(summaries):
        products = _gram_space_products(summaries)
    else:
        products = _feature_space_products(summaries)
    self_norms = torch.diagonal(products).clone()  # [L] ||X_i^T X_i||_F^2 = ||K_i||_F^2
    dead = self_norms <= _ZERO_NORM
    if bool(dead.any()):
        logger.warning(
            "units %s have all-zero (normalised) features; their RM is set to 0",
            dead.nonzero().flatten().tolist(),
        )
    self_norms = torch.where(dead, torch.ones_like(self_norms), self_norms).sqrt()
    psi = products / (self_norms[:, None] * self_norms[None, :])  # [L, L]
    psi = psi.masked_fill(dead[:, None] | dead[None, :], 0.0)
    psi = (psi + psi.T) / 2
    return psi.clamp_(0.0, 1.0).fill_diagonal_(1.0)
