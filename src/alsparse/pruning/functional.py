"""Pure pruning math: tensors in, tensors out. No modules, hooks or logging.

Conventions: weights are ``[O, I]`` (outputs x inputs); a ``prune_mask`` is True where a weight
becomes zero. Unstructured masks prune exactly ``k = floor(s * numel)`` entries of a matrix, ties
broken by a stable sort on the index (SmolLM2's dequantised weights have many ties; the research
code's ``<= threshold`` would prune more than k). Per-row comparison (Wanda) gives every row
floor(k / O) and one more to the k mod O rows whose next candidate scores lowest; SparseGPT's
column blocks get the cumulative floor(s * O * end) - floor(s * O * start). So s = k / numel
prunes exactly k, whatever the width.
"""

from __future__ import annotations

import math

import torch

from ..config import Pattern


def num_pruned(sparsity: float, group_size: int) -> int:
    """k = floor(s * group) zeros per comparison group. The epsilon guards 0.3*10 = 2.9999 and
    s = k / numel on matrices up to ~1e9 weights (float64 error ~1e-16 * k), and moves no sensible s."""
    return int(math.floor(sparsity * group_size + 1e-6))


def row_order(scores: torch.Tensor) -> torch.Tensor:
    """Each row's entries from the lowest score up (stable: ties in index order), ``[R, G]``. One
    order serves every k: the masks of several sparsities of one matrix need one sort."""
    return torch.sort(scores, dim=-1, stable=True).indices


def lowest_k_mask(scores: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the k lowest entries of each row of ``scores`` ``[R, G]`` (stable ties);
    ``order``: :func:`row_order` of ``scores``, when the caller has it."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    order = row_order(scores) if order is None else order
    prune_mask = torch.zeros_like(scores, dtype=torch.bool)
    return prune_mask.scatter_(1, order[:, :k], True)


def nm_groups(scores: torch.Tensor, m: int) -> torch.Tensor:
    """``scores [O, I]`` as its comparison groups of m consecutive inputs, ``[O * I / m, m]``."""
    if scores.shape[1] % m:
        raise ValueError(f"N:M with M={m} needs in_features divisible by {m}, got {scores.shape[1]}")
    return scores.reshape(-1, m)


def nm_mask(scores: torch.Tensor, n: int, m: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Prune the n lowest of every m consecutive inputs in each row; scores ``[O, I]``, I % m == 0.
    ``order``: :func:`row_order` of :func:`nm_groups`, when the caller has it."""
    return lowest_k_mask(nm_groups(scores, m), n, order).reshape(scores.shape)


def per_row_mask(scores: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Prune exactly ``k`` entries of ``scores [O, I]``, spread over the rows: floor(k / O) each (the
    lowest), and one more in the k mod O rows whose lowest unpruned score is smallest (stable).
    ``order``: :func:`row_order` of ``scores``, when the caller has it."""
    rows, cols = scores.shape
    if not 0 <= k <= rows * cols:
        raise ValueError(f"cannot prune {k} of {rows * cols} entries")
    base, extra = divmod(k, rows)
    order = row_order(scores) if order is None else order  # [O, I]
    prune_mask = torch.zeros_like(scores, dtype=torch.bool)
    prune_mask.scatter_(1, order[:, :base], True)
    if extra:
        next_scores = scores.gather(1, order[:, base : base + 1]).squeeze(1)  # [O]
        chosen = torch.sort(next_scores, stable=True).indices[:extra]  # [extra]
        prune_mask[chosen, order[chosen, base]] = True
    return prune_mask


def score_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool,
               count: int | None = None, orders: dict | None = None) -> torch.Tensor:
    """The prune_mask for ``scores [O, I]``: N:M, or unstructured over the matrix (``count`` entries,
    default floor(s * O * I)), spread per output row or chosen over the whole matrix. ``orders``: a
    dict kept by a caller that masks one matrix at several sparsities (the sorts are done once)."""
    orders = {} if orders is None else orders
    if pattern.is_nm:
        key = ("nm", pattern.m)
        if key not in orders:
            orders[key] = row_order(nm_groups(scores, pattern.m))
        return nm_mask(scores, pattern.n, pattern.m, orders[key])
    k = num_pruned(sparsity, scores.numel()) if count is None else count
    if per_row:
        if "rows" not in orders:
            orders["rows"] = row_order(scores)
        return per_row_mask(scores, k, orders["rows"])
    flat = scores.reshape(1, -1)  # [1, O * I]
    if "matrix" not in orders and k > 0:
        orders["matrix"] = row_order(flat)
    return lowest_k_mask(flat, k, orders.get("matrix")).reshape(scores.shape)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()  # [O, I]


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_rc| * ||X_c||_2 with ``input_sq_norms [I]`` = sum over tokens of x_c^2."""
    return weight.abs() * input_sq_norms.clamp_min(0).sqrt().unsqueeze(0)  # [O, I]


def apply_prune_mask(weight: torch.Tensor, prune_mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(prune_mask, 0)


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    damp: float = 0.01,
    prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with a damped Hessian, column blocks.
    ``prepared``: :func:`prepare_hessian` of ``hessian`` and ``damp``, when the caller has it
    (a strength search prunes one linear at several ratios from one Hessian).

    ``weight [O, I]``, ``hessian [I, I]`` (proportional to sum x x^T, fp32). Unstructured: in each
    column block ``[O, B]`` prune exactly floor(s * O * B) entries of lowest w^2 / [H^-1]_cc^2 (the
    adaptive mask). N:M: n lowest of every m columns per row. Returns the updated, pruned weight.
    """
    W = weight.detach().to(torch.float32).clone()  # [O, I]
    cols = W.shape[1]
    if pattern.is_nm and (cols % pattern.m or blocksize % pattern.m):
        raise ValueError(
            f"N:M with M={pattern.m} needs in_features ({cols}) and the SparseGPT block size ({blocksize}) "
            f"divisible by {pattern.m}"
        )
    dead, Hinv = prepared if prepared is not None else prepare_hessian(hessian, damp)
    W[:, dead] = 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        _sparsegpt_block(W, Hinv, start, end, sparsity, pattern)
    return W.to(weight.dtype)


def prepare_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead input columns ``[I]`` bool, upper Cholesky factor of the damped H^-1 ``[I, I]``): the
    part of SparseGPT that depends on the Hessian only, not on the weight or the ratio."""
    H = hessian.detach().to(torch.float32).clone()  # [I, I]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return dead, _inverse_cholesky_upper(H, damp)


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 = U^T U; retries with 10x damping twice.

    Computed without forming the inverse: with J the reversal permutation, chol(J H J) = L gives
    H = R R^T for the upper triangular R = J L J, so H^-1 = R^-T R^-1 and U = R^-1 (a triangular
    solve). The reference code's cholesky_inverse + second Cholesky gives the same U to float
    rounding (2.5e-7 relative at 1536) and as fast on an idle CPU, but slower when another process
    keeps the cores busy: 0.47 against 0.26 s (median) at 1536 (benchmarks/bench_hessian_inverse.py)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(3):
        damped = H + (damp * 10**attempt) * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if info == 0:
            U = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)
            if bool(torch.isfinite(U).all()):
                return U
    raise ValueError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp * 100:g}x mean(diag H); "
        "check the calibration activations for NaN/Inf or use fp32 statistics"
    )


def _sparsegpt_block(W, Hinv, start: int, end: int, sparsity: float, pattern: Pattern) -> None:
    W1 = W[:, start:end].clone()  # [O, B]
    Hinv1 = Hinv[start:end, start:end]  # [B, B]
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    diag = torch.diag(Hinv1)  # [B]
    if not pattern.is_nm:
        saliency = W1**2 / diag.unsqueeze(0) ** 2
        rows = W.shape[0]  # this block's share of the matrix's count, cumulative so the total is exact
        count = num_pruned(sparsity, rows * end) - num_pruned(sparsity, rows * start)
        block_mask = score_mask(saliency, sparsity, pattern, per_row=False, count=count)
    for j in range(end - start):
        w = W1[:, j]
        d = diag[j]
        if pattern.is_nm and j % pattern.m == 0:
            group = W1[:, j : j + pattern.m] ** 2 / diag[j : j + pattern.m].unsqueeze(0) ** 2
            group_mask = lowest_k_mask(group, pattern.n)
        prune_col = group_mask[:, j % pattern.m] if pattern.is_nm else block_mask[:, j]
        q = w.masked_fill(prune_col, 0)
        Q1[:, j] = q
        err = (w - q) / d
        W1[:, j:] -= err.unsqueeze(1) * Hinv1[j, j:].unsqueeze(0)
        Err1[:, j] = err
    W[:, start:end] = Q1
    W[:, end:] -= Err1 @ Hinv[start:end, end:]
