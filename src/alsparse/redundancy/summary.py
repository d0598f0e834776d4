"""Fixed-size streaming summary of one unit's features over a fixed set of calibration tokens.

Every unit must be summarised over the SAME token rows (``select_tokens`` once, pass the index to
every ``FeatureSummary``) so that redundancy compares like with like.

Numerics: rows are kept in float32 (the accumulation precision); normalisation and the Gram are
computed in float64 and stored once as float32.

Memory: while a unit is being built its kept rows ``[m, D]`` are buffered. ``finalize`` keeps
either the normalised rows ``[m, D]`` or, when ``D > m``, the Gram ``K = X X^T`` ``[m, m]``, so a
finished summary never holds more than ``m * min(m, D)`` numbers, whatever the width D.
"""

from __future__ import annotations

import torch

NORMALIZATIONS = ("center", "standardize", "none")
STORAGES = ("auto", "rows", "gram")
_CONSTANT_RTOL = 1e-9  # a column whose std is below this fraction of its max |value| is constant


def select_tokens(total_tokens: int, m: int | None, seed: int) -> torch.LongTensor:
    """Sorted global row indices to keep: all ``total_tokens`` rows (exact mode) when ``m`` is None
    or ``m >= total_tokens``, else a seeded uniform subset of ``m`` rows."""
    if total_tokens < 2:
        raise ValueError(f"need at least 2 calibration tokens, got total_tokens={total_tokens}")
    if m is None or m >= total_tokens:
        return torch.arange(total_tokens, dtype=torch.long)
    if m < 2:
        raise ValueError(f"token subset size m must be >= 2 (or None for all tokens), got {m}")
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(total_tokens, generator=generator)[:m]
    return torch.sort(subset).values


def normalize_columns(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """Feature-Norm over tokens (rows): "center" X - mean_col(X) (makes RM linear CKA),
    "standardize" (X - mean) / std (population std), "none". Constant columns (std <= 1e-9 max|x|)
    become exactly 0 so that a constant unit is detected as all-zero downstream."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    if normalize == "none":
        return x
    centred = x - x.mean(dim=0, keepdim=True)  # [m, D]
    std = centred.pow(2).mean(dim=0, keepdim=True).sqrt()  # [1, D]
    constant = std <= _CONSTANT_RTOL * x.abs().amax(dim=0, keepdim=True)  # rounding noise only
    centred = centred.masked_fill(constant, 0.0)
    if normalize == "standardize":
        centred = centred / torch.where(constant, torch.ones_like(std), std)
    return centred


class FeatureSummary:
    """Kept rows of one unit's feature matrix, filled micro-batch by micro-batch.

    ``token_index``: sorted unique global row indices (into the flattened ``[M, D]`` features of all
    calibration tokens) to keep. ``storage``: "auto" (Gram when D > m), "rows" or "gram".
    """

    def __init__(
        self,
        token_index: torch.Tensor,
        normalize: str = "center",
        storage: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")
        if storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; choose one of: {', '.join(STORAGES)}")
        token_index = torch.as_tensor(token_index, dtype=torch.long).flatten().cpu()
        if token_index.numel() < 2:
            raise ValueError(f"token_index must hold at least 2 rows, got {token_index.numel()}")
        if bool((token_index[1:] <= token_index[:-1]).any()) or int(token_index[0]) < 0:
            raise ValueError("token_index must be sorted, unique and non-negative (see select_tokens)")
        self.token_index = token_index  # [m]
        self.normalize = normalize
        self.storage = storage
        self.device = device
        self._rows: torch.Tensor | None = None  # [m, D] float32 while building
        self._filled = torch.zeros(token_index.numel(), dtype=torch.bool)  # [m]
        self.kind: str | None = None  # "rows" or "gram" once finalized
        self.matrix: torch.Tensor | None = None  # [m, D] or [m, m] once finalized

    @property
    def num_tokens(self) -> int:
        return self.token_index.numel()

    @property
    def finalized(self) -> bool:
        return self.matrix is not None

    def update(self, features: torch.Tensor, token_offset: int) -> None:
        """Keep the selected rows of ``features`` ``[B, T, D]`` or ``[N, D]``, whose flattened rows
        are global rows ``token_offset .. token_offset + N - 1``."""
        if self.finalized:
            raise ValueError("FeatureSummary.update called after finalize")
        if token_offset < 0:
            raise ValueError(f"token_offset must be >= 0, got {token_offset}")
        if features.dim() < 2:
            raise ValueError(f"features must be [B, T, D] or [N, D], got shape {tuple(features.shape)}")
        flat = features.detach().reshape(-1, features.shape[-1])  # [N, D]
        n_rows, width = flat.shape
        if self._rows is None:
            device = self.device if self.device is not None else flat.device
            self._rows = torch.zeros(self.num_tokens, width, dtype=torch.float32, device=device)
        elif width != self._rows.shape[1]:
            raise ValueError(f"feature width changed from {self._rows.shape[1]} to {width}")
        start = int(torch.searchsorted(self.token_index, token_offset))
        stop = int(torch.searchsorted(self.token_index, token_offset + n_rows))
        if start == stop:
            return
        if bool(self._filled[start:stop].any()):
            raise ValueError(
                f"rows at token_offset={token_offset} were already received (overlapping offsets)"
            )
        local = (self.token_index[start:stop] - token_offset).to(flat.device)  # [k]
        self._rows[start:stop] = flat.index_select(0, local).to(self._rows.device, torch.float32)
        self._filled[start:stop] = True

    def reduce_(self, op) -> None:
        """Combine the rows kept by several data-parallel processes with a sum collective ``op``:
        each row was filled by exactly one process (the others hold zeros), so the sum is exact."""
        if self.finalized:
            raise ValueError("FeatureSummary.reduce_ called after finalize")
        if self._rows is None:
            raise ValueError("FeatureSummary.reduce_ called before any update (its width is unknown)")
        filled = self._filled.to(self._rows.device, torch.int32)  # NCCL reduces device tensors only
        op(self._rows)
        op(filled)
        if bool((filled > 1).any()):
            raise ValueError("the same token rows were kept by several processes (overlapping calibration shards)")
        self._filled = filled.cpu().bool()

    def finalize(self) -> torch.Tensor:
        """Normalise the kept rows and store rows ``[m, D]`` or the Gram ``[m, m]``; idempotent."""
        if self.finalized:
            return self.matrix
        missing = int((~self._filled).sum())
        if self._rows is None or missing:
            first = int(self.token_index[(~self._filled).nonzero()[0, 0]]) if missing else 0
            raise ValueError(
                f"finalize called before all selected rows arrived: {missing} of {self.num_tokens} "
                f"missing (first missing global row {first})"
            )
        x = normalize_columns(self._rows.double(), self.normalize)  # [m, D]
        use_gram = self.storage == "gram" or (self.storage == "auto" and x.shape[1] > x.shape[0])
        self.kind = "gram" if use_gram else "rows"
        self.matrix = (x @ x.T if use_gram else x).float()  # [m, m] or [m, D]
        self._rows = None
        return self.matrix

    def gram(self) -> torch.Tensor:
        """Gram ``K = X X^T`` ``[m, m]`` in float64 of the finalized, normalised features."""
        if not self.finalized:
            raise ValueError("FeatureSummary.gram called before finalize")
        x = self.matrix.double()
        return x if self.kind == "gram" else x @ x.T
