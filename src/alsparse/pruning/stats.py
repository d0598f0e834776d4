"""Streaming statistics of one linear's inputs: each micro-batch's sums are computed in float32 and
accumulated in float64, so the order in which micro-batches (or data-parallel processes) are added
changes the result far below float32 resolution, and the masks not at all."""

from __future__ import annotations

import torch


class InputStats:
    """Sum of squares per input feature (Wanda) and/or sum of x x^T (SparseGPT) over all tokens."""

    def __init__(self, in_features: int, device: torch.device | str, norms: bool, hessian: bool) -> None:
        self.tokens = 0
        self._sq = torch.zeros(in_features, dtype=torch.float64, device=device) if norms else None  # [I]
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if hessian else None
        self._derived: dict = {}  # what pruners compute from the sums (SparseGPT's H^-1), until they change

    def update(self, x: torch.Tensor) -> None:
        """Add a micro-batch of inputs ``x [..., I]``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # [N, I]
        self.tokens += x.shape[0]
        self._derived.clear()
        if self._sq is not None:
            self._sq += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx += x.T @ x

    @property
    def sq_norms(self) -> torch.Tensor | None:
        """Sum over tokens of x_c^2 per input feature ``[I]`` (float32)."""
        return None if self._sq is None else self._sq.float()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/N sum x x^T (the SparseGPT convention; scale does not change the result), float32."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the Hessian")
        return (self.xtx * (2.0 / max(self.tokens, 1))).float()

    def derived(self, key, compute):
        """``compute()``, kept for later calls with the same ``key`` until the sums change: a
        strength search prunes each linear at several ratios from the same statistics."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def forget_derived(self) -> None:
        """Drop what :meth:`derived` kept (SparseGPT's I x I factor: as large as the Hessian in fp32)."""
        self._derived.clear()

    def check_finite(self, where: str) -> None:
        for name, t in (("input norms", self._sq), ("Hessian", self.xtx)):
            if t is not None and not torch.isfinite(t).all():
                raise FloatingPointError(
                    f"{where}: NaN/Inf in the calibration {name} (overflow in fp16 activations?); "
                    "load the model in bf16 or fp32"
                )

    def reduce_(self, op) -> None:
        """Apply a collective (e.g. an all-reduce sum) to every accumulated tensor and the count."""
        self._derived.clear()
        for t in (self._sq, self.xtx):
            if t is not None:
                op(t)
        device = (self._sq if self._sq is not None else self.xtx).device
        count = torch.tensor([float(self.tokens)], dtype=torch.float64, device=device)
        op(count)
        self.tokens = int(count.item())
