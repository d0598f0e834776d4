"""Streaming statistics of one linear's inputs, accumulated in fp32."""

from __future__ import annotations

import torch


class InputStats:
    """Sum of squares per input feature (Wanda) and/or sum of x x^T (SparseGPT) over all tokens."""

    def __init__(self, in_features: int, device: torch.device | str, norms: bool, hessian: bool) -> None:
        self.tokens = 0
        self.sq_norms = torch.zeros(in_features, dtype=torch.float32, device=device) if norms else None  # [I]
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def update(self, x: torch.Tensor) -> None:
        """Add a micro-batch of inputs ``x [..., I]``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # [N, I]
        self.tokens += x.shape[0]
        if self.sq_norms is not None:
            self.sq_norms += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/N sum x x^T (the SparseGPT convention; scale does not change the result)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the Hessian")
        return self.xtx * (2.0 / max(self.tokens, 1))

    def check_finite(self, where: str) -> None:
        for name, t in (("input norms", self.sq_norms), ("Hessian", self.xtx)):
            if t is not None and not torch.isfinite(t).all():
                raise FloatingPointError(
                    f"{where}: NaN/Inf in the calibration {name} (overflow in fp16 activations?); "
                    "load the model in bf16 or fp32"
                )

    def reduce_(self, op) -> None:
        """Apply a collective (e.g. an all-reduce sum) to every accumulated tensor and the count."""
        for t in (self.sq_norms, self.xtx):
            if t is not None:
                op(t)
        count = torch.tensor([float(self.tokens)])
        op(count)
        self.tokens = int(count.item())
