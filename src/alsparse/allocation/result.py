"""What an allocator returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AllocationResult:
    """Per-unit sparsity (fraction of zeros) ``[L]`` float64 and JSON-serialisable diagnostics."""

    sparsity: torch.Tensor  # [L] float64
    diagnostics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity.tolist(), "diagnostics": self.diagnostics}
