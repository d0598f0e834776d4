"""ATP's beta, chosen by loss on held-out calibration windows (never on the evaluation text).

For each beta on a feasible grid, a copy of the dense model is pruned with ATP(beta) on the first
3/4 of the calibration windows and scored by its mean next-token loss on the last 1/4; the beta
with the lowest loss wins. Cost: one pruning run per grid point (on a model copy in memory).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

log = logging.getLogger(__name__)


def heldout_loss(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL over ``ids [N, T]`` (positions 1..T-1)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(next(model.parameters()).device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += batch[:, 1:].numel()
    return total / count


def select_beta(model, calibration: torch.Tensor, config) -> tuple[float, dict]:
    from .allocation import atp_beta_grid
    from .api import prune_
    from .models import decoder_blocks

    if calibration.shape[0] < 2:
        raise ValueError("ATP beta search needs at least 2 calibration windows (3/4 to prune, 1/4 held out)")
    held = max(1, calibration.shape[0] // 4)
    fit, heldout = calibration[:-held], calibration[-held:]
    grid = [float(b) for b in atp_beta_grid(len(decoder_blocks(model)), config.sparsity, n=config.baselines.atp_grid)]
    losses = []
    for beta in grid:
        trial = copy.deepcopy(model)
        cfg = dataclasses.replace(config, baselines=dataclasses.replace(config.baselines, atp_beta=beta))
        prune_(trial, fit, cfg)
        losses.append(heldout_loss(trial, heldout, config.batch_size))
        log.info("ATP beta %.4f: held-out calibration loss %.4f", beta, losses[-1])
        del trial
    best = min(range(len(grid)), key=lambda i: (losses[i], i))
    return grid[best], {"beta": grid[best], "beta_grid": grid, "heldout_loss": losses, "heldout_windows": held}
