"""AlphaPruning (NeurIPS 2024): heavy-tail exponent of each weight's eigen-spectrum -> sparsity.

    eigenvalues of W^T W = svdvals(W)^2; p(lambda) ~ lambda^-alpha for lambda >= x_min
    alpha = 1 + k / sum_{lambda >= x_min} ln(lambda / x_min)            (Hill / MLE, k tail size)
    x_min = argmin over candidate eigenvalues of the KS distance
            max_k |1 - (lambda_k / x_min)^(1 - alpha) - k / n|           (as in the reference)
    block alpha (mean over its linears) -> s linear in [S (1 - eps), S (1 + eps)] (higher alpha ->
    more sparsity), rescaled by S / mean(s) as the reference does (size-weighted mean).
"""

from __future__ import annotations

import torch

from alsparse.allocation._common import as_sizes, as_vector, check_target, minmax_scale, shift_to_mean

_CHUNK = 256  # candidates evaluated together: memory [_CHUNK, N] float64


def _candidates(count: int, max_candidates: int) -> torch.Tensor:
    """Candidate x_min positions 0..count-1, evenly thinned to at most max_candidates."""
    if count <= max_candidates:
        return torch.arange(count)
    return torch.unique(torch.linspace(0, count - 1, max_candidates).round().long())


def _ks_distances(log_eig: torch.Tensor, starts: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """KS distance ``[C]`` of the power law (x_min = eig[start], alpha) against the tail."""
    total = log_eig.numel()
    positions = torch.arange(total, dtype=torch.float64)  # [N]
    tail_size = (total - starts).double()[:, None]  # [C, 1]
    rank = positions[None, :] - starts.double()[:, None]  # [C, N]; k = 0.. inside the tail
    log_ratio = log_eig[None, :] - log_eig[starts][:, None]  # [C, N]
    fitted = 1.0 - torch.exp((1.0 - alphas[:, None]) * log_ratio)
    distance = (fitted - rank / tail_size).abs().masked_fill(rank < 0, 0.0)
    return distance.amax(dim=1)


def hill_alpha(
    eigenvalues: torch.Tensor, max_candidates: int = 1000, min_tail: int = 2, min_eigenvalue: float = 1e-5
) -> float:
    """Power-law exponent of an eigenvalue spectrum (Hill estimator, x_min by KS distance).

    Eigenvalues <= min_eigenvalue are dropped (the reference's EVALS_THRESH). Candidates are the
    eigenvalues leaving >= min_tail points in the tail, evenly thinned to at most max_candidates
    (exact search when fewer)."""
    eig = torch.sort(torch.as_tensor(eigenvalues, dtype=torch.float64).detach().cpu().flatten()).values
    eig = eig[eig > min_eigenvalue]  # [N] ascending
    if eig.numel() < max(min_tail, 2) + 1:
        raise ValueError(
            f"need more than {max(min_tail, 2)} eigenvalues above {min_eigenvalue}, got {eig.numel()}"
        )
    log_eig = eig.log()
    tail_log_sums = torch.flip(torch.cumsum(torch.flip(log_eig, [0]), 0), [0])  # [N] sum_{k>=i} ln
    starts = _candidates(eig.numel() - max(min_tail, 2) + 1, max_candidates)  # [C]
    tail_size = (eig.numel() - starts).double()
    spread = tail_log_sums[starts] - tail_size * log_eig[starts]  # sum ln(lambda / x_min)
    alphas = 1.0 + tail_size / spread.clamp(min=1e-300)
    chunks = range(0, starts.numel(), _CHUNK)
    distances = torch.cat(
        [_ks_distances(log_eig, starts[i : i + _CHUNK], alphas[i : i + _CHUNK]) for i in chunks]
    )  # [C]
    distances = distances.masked_fill((spread <= 0) | (alphas <= 1.0), float("inf"))
    if not bool(torch.isfinite(distances).any()):
        raise ValueError("hill_alpha: every candidate tail is degenerate (all eigenvalues equal)")
    return float(alphas[torch.argmin(distances)])


def esd_alpha(weight: torch.Tensor, **kw) -> float:
    """hill_alpha of the eigenvalues of W^T W for a weight ``[O, I]`` (svdvals in float64)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix [O, I], got shape {tuple(weight.shape)}")
    singular = torch.linalg.svdvals(weight.detach().double())  # [min(O, I)]
    return hill_alpha(singular**2, **kw)


def alphapruning_allocate(block_alpha, sizes, target: float, eps: float = 0.3) -> torch.Tensor:
    """Per-block sparsity ``[L]`` float64 from block alphas ``[L]``; equal alphas -> uniform."""
    target = check_target(target)
    alpha = as_vector(block_alpha, "block_alpha")
    sizes = as_sizes(sizes, alpha.numel())
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"AlphaPruning eps must be in [0, 1], got {eps}")
    sparsity = target * (1.0 - eps) + minmax_scale(alpha, 2.0 * eps * target)  # [L]
    mean = float(torch.sum(sizes * sparsity) / sizes.sum())
    if mean > 0.0:
        sparsity = sparsity * (target / mean)
    return shift_to_mean(sparsity, sizes, target)  # exact mean; clips to [0, 0.99] if needed
