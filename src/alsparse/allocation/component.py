"""ALS at component level: one ratio per linear, K linears per block, L blocks, block-major order.

Two-stage: solve the block LP over Psi_blocks ``[L, L]`` to get s_i; then inside block i solve the
same program over its linears' Psi ``[K, K]`` with sizes n_ik, target s_i (budget n_i (1 - s_i))
and relative bounds [s_i - delta, s_i + delta] intersected with the global box: [S - delta, S + delta]
(clipped to [0, 0.99]), or the block's absolute [lo_i, hi_i] when bounds_mode="absolute". So no
linear ever leaves the box the target allows (the inner bounds once followed the block's ratio alone,
and a block at S + delta let gate/up reach 0.99 on SmolLM2). Joint: one (K L) x (K L) problem.
"""

from __future__ import annotations

import torch

from alsparse.allocation._common import as_sizes, weighted_mean
from alsparse.allocation.als import als_allocate, bounds
from alsparse.allocation.result import AllocationResult

_SIZE_RTOL = 1e-9


def _block_bound(value, block: int):
    if value is None or isinstance(value, (int, float)):
        return value
    return float(torch.as_tensor(value, dtype=torch.float64).flatten()[block])


def _check_blocks(block_sizes, component_psis, component_sizes) -> torch.Tensor:
    block_sizes = as_sizes(block_sizes)
    if not len(component_psis) == len(component_sizes) == block_sizes.numel():
        raise ValueError(
            f"need one component psi and one component size vector per block: got {block_sizes.numel()} "
            f"blocks, {len(component_psis)} psis, {len(component_sizes)} size vectors"
        )
    for block, sizes in enumerate(component_sizes):
        total = float(as_sizes(sizes).sum())
        if abs(total - float(block_sizes[block])) > _SIZE_RTOL * total:
            raise ValueError(
                f"block {block}: block size {float(block_sizes[block])} != sum of its linears' sizes {total}"
            )
    return block_sizes


def als_two_stage(
    block_psi, block_sizes, component_psis, component_sizes, target: float, **kw
) -> AllocationResult:
    """Sparsity ``[K L]`` per linear (block-major); each block's linears meet its stage-1 budget."""
    block_sizes = _check_blocks(block_sizes, component_psis, component_sizes)
    stage1 = als_allocate(block_psi, block_sizes, target, **kw)
    delta = kw.get("delta", 0.2)
    absolute = kw.get("bounds_mode", "relative") == "absolute"
    box_lo, box_hi = (float(v[0]) for v in bounds(target, 1, delta, "relative"))  # the global box
    pieces, stage2 = [], []
    for block, (psi, sizes) in enumerate(zip(component_psis, component_sizes)):
        block_target = float(stage1.sparsity[block])
        s_lo, s_hi = bounds(block_target, len(as_sizes(sizes)), delta, "relative")
        if absolute:
            s_lo = s_lo.clamp(min=_block_bound(kw["lo"], block))
            s_hi = s_hi.clamp(max=_block_bound(kw["hi"], block))
        else:
            s_lo, s_hi = s_lo.clamp(min=min(box_lo, block_target)), s_hi.clamp(max=max(box_hi, block_target))
        inner = {**kw, "bounds_mode": "absolute", "lo": s_lo, "hi": s_hi}
        result = als_allocate(psi, sizes, block_target, **inner)
        pieces.append(result.sparsity)
        stage2.append(result.diagnostics)
    sparsity = torch.cat(pieces)  # [K L]
    all_sizes = torch.cat([as_sizes(sizes) for sizes in component_sizes])
    diagnostics = {
        "allocator": "als_two_stage",
        "target": float(target),
        "mean_sparsity": weighted_mean(sparsity, all_sizes),
        "block_sparsity": stage1.sparsity.tolist(),
        "stage1": stage1.diagnostics,
        "stage2": stage2,
    }
    return AllocationResult(sparsity=sparsity, diagnostics=diagnostics)


def als_joint(psi_all, sizes_all, target: float, **kw) -> AllocationResult:
    """One ALS problem over all K L linears (Psi ``[K L, K L]``, block-major)."""
    result = als_allocate(psi_all, sizes_all, target, **kw)
    result.diagnostics["allocator"] = "als_joint"
    return result
