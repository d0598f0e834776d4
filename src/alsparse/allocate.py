"""Allocation orchestration: units, the dense pass 1, and the registry of allocators.

An allocator turns an :class:`AllocationContext` into one sparsity per unit. Whatever data it
needs (RM feature summaries, Wanda scores, weights) is declared in ``needs`` and collected here
in a single dense stream over the blocks; the math lives in ``alsparse.allocation``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import Pattern, PruneConfig
from .models import decoder_blocks, find_linears, resident
from .registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """What one allocated ratio applies to: a block, or one linear of a block."""

    name: str  # "model.layers.3" or "model.layers.3.mlp.down_proj"
    block: int
    linears: tuple[str, ...]  # linear paths inside the block
    size: int  # prunable weights


def block_prefix(model: nn.Module) -> str:
    from .models import BLOCK_PATHS, family

    return BLOCK_PATHS[family(model)]


def make_units(model: nn.Module, level: str) -> list[Unit]:
    prefix = block_prefix(model)
    units = []
    for i, block in enumerate(decoder_blocks(model)):
        refs = find_linears(block)
        if level == "block":
            units.append(Unit(f"{prefix}.{i}", i, tuple(r.name for r in refs), sum(r.numel for r in refs)))
        else:
            units.extend(Unit(f"{prefix}.{i}.{r.name}", i, (r.name,), r.numel) for r in refs)
    return units


@dataclass
class Allocation:
    """Per-unit sparsity (and N:M n per unit for mixed N:M), with the allocator's diagnostics."""

    units: list[Unit]
    sparsity: list[float]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    nm_n: Optional[list[int]] = None
    nm_m: int = 0
    # unstructured: zeros per linear ("block:linear" -> (count, numel)), rounded over the whole model
    # so that the achieved size-weighted sparsity is the target to one weight (see exact_counts)
    zeros: Optional[dict[str, tuple[int, int]]] = None

    def target(self, block: int, linear: str) -> tuple[float, Pattern]:
        for i, unit in enumerate(self.units):
            if unit.block == block and linear in unit.linears:
                if self.nm_n is not None:
                    n = self.nm_n[i]
                    return n / self.nm_m, Pattern(n, self.nm_m) if n > 0 else Pattern()
                if self.zeros is not None and f"{block}:{linear}" in self.zeros:
                    count, numel = self.zeros[f"{block}:{linear}"]
                    return count / numel, Pattern()
                return self.sparsity[i], Pattern()
        raise KeyError(f"no unit covers block {block} linear {linear!r}")

    def mean(self) -> float:
        total = sum(u.size for u in self.units)
        return sum(s * u.size for s, u in zip(self.effective(), self.units)) / total

    def effective(self) -> list[float]:
        if self.nm_n is None:
            return list(self.sparsity)
        return [n / self.nm_m for n in self.nm_n]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "units": [u.name for u in self.units],
            "unit_sizes": [u.size for u in self.units],
            "sparsity": [float(s) for s in self.sparsity],
            "mean_sparsity": self.mean(),
            "diagnostics": self.diagnostics,
        }
        if self.nm_n is not None:
            out["nm"] = {"m": self.nm_m, "n": list(self.nm_n), "mix": _nm_mix(self.nm_n, self.nm_m)}
        return out

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this allocation exactly (a resume checkpoint holds it)."""
        return {
            "units": [{"name": u.name, "block": u.block, "linears": list(u.linears), "size": u.size} for u in self.units],
            "sparsity": [float(s) for s in self.sparsity],
            "diagnostics": self.diagnostics,
            "nm_n": None if self.nm_n is None else list(self.nm_n),
            "nm_m": self.nm_m,
            "zeros": None if self.zeros is None else {k: list(v) for k, v in self.zeros.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Allocation":
        units = [Unit(u["name"], u["block"], tuple(u["linears"]), u["size"]) for u in state["units"]]
        zeros = state.get("zeros")
        zeros = None if zeros is None else {k: (int(v[0]), int(v[1])) for k, v in zeros.items()}
        return cls(units, list(state["sparsity"]), state["diagnostics"], state["nm_n"], state["nm_m"], zeros)


def _nm_mix(ns: list[int], m: int) -> dict[str, int]:
    mix: dict[str, int] = {}
    for n in ns:
        key = f"{n}:{m}"
        mix[key] = mix.get(key, 0) + 1
    return dict(sorted(mix.items()))


@dataclass
class AllocationContext:
    model: nn.Module
    config: PruneConfig
    units: list[Unit]
    data: dict[str, Any]  # what pass 1 collected, by need

    @property
    def sizes(self) -> torch.Tensor:
        return torch.tensor([u.size for u in self.units], dtype=torch.float64)

    @property
    def target(self) -> float:
        return float(self.config.sparsity)


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable[[AllocationContext], tuple[torch.Tensor, dict]]
    needs: frozenset = frozenset()  # subset of {"features", "wanda"}
    description: str = ""

    def level(self, config: PruneConfig) -> str:
        return config.als.level if self.name == "als" else "block"


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def register(name: str, needs: tuple[str, ...] = (), description: str = ""):
    def decorator(fn):
        ALLOCATORS.register(name)(Allocator(name, fn, frozenset(needs), description))
        return fn

    return decorator


def allocation_needs(config: PruneConfig) -> frozenset:
    return ALLOCATORS.get(config.allocation).needs


def allocate(model: nn.Module, config: PruneConfig, data: dict[str, Any], warn: bool = True) -> Allocation:
    """Run the configured allocator on ``data`` (from :func:`alsparse.pass1.collect`); ``warn=False``
    for trial allocations (a strength search's candidates) that may never be used."""
    allocator = ALLOCATORS.get(config.allocation)
    units = make_units(model, allocator.level(config))
    sparsity, diagnostics = allocator.fn(AllocationContext(model, config, units, data))
    sparsity = [float(s) for s in sparsity]
    _check_range(sparsity, units, config.allocation)
    if warn:
        _warn_near_total(sparsity, units, config)
    allocation = Allocation(units, sparsity, diagnostics)
    pattern = config.parsed_pattern
    if pattern.is_nm:
        _to_nm(allocation, pattern)
    else:
        allocation.zeros = exact_counts(model, allocation)
    (log.info if warn else log.debug)("allocation %s: mean sparsity %.6f over %d units", config.allocation,
                                      allocation.mean(), len(units))
    return allocation


def exact_counts(model: nn.Module, allocation: Allocation) -> dict[str, tuple[int, int]]:
    """Zeros per linear, (count, numel), with sum(count) = round(sum_l s_l n_l): each linear gets
    floor(s_l n_l) and the remainder goes one weight each to the largest fractional parts (ties: model
    order). The pruners then prune exactly that count (Wanda spreads a matrix's count over its rows,
    SparseGPT over its column blocks), so the achieved size-weighted sparsity equals the allocated
    mean to within half a weight of the whole model, not just floor(s * group) per group."""
    from .allocation.lp import largest_remainder

    keys, wanted = [], []
    for index, block in enumerate(decoder_blocks(model)):
        for ref in find_linears(block):
            sparsity, _ = allocation.target(index, ref.name)
            keys.append((f"{index}:{ref.name}", ref.numel))
            wanted.append(sparsity * ref.numel)
    counts = largest_remainder(wanted, [numel for _, numel in keys])
    return {key: (count, numel) for (key, numel), count in zip(keys, counts)}


def _check_range(sparsity: list[float], units: list[Unit], name: str) -> None:
    for s, unit in zip(sparsity, units):
        if not (0 <= s < 1) or s != s:
            raise ValueError(f"allocator {name!r} gave sparsity {s} to {unit.name}; allowed range is [0, 1)")


NEAR_TOTAL = 0.95  # a unit allocated this much (or more) is all but removed


def _warn_near_total(sparsity: list[float], units: list[Unit], config: PruneConfig) -> None:
    """Say so when an allocator all but removes a unit the target did not ask to remove."""
    if config.sparsity >= NEAR_TOTAL:
        return
    hit = [(unit.name, s) for s, unit in zip(sparsity, units) if s >= NEAR_TOTAL]
    if not hit:
        return
    examples = ", ".join(f"{name} {s:.2f}" for name, s in hit[:3])
    hint = (" (ALS: the bounds are target +- delta, and at component level the block's own ratio +- delta;"
            " a smaller delta or block level keeps units away from the cap)" if config.allocation == "als" else "")
    log.warning("allocation %s puts %d of %d units at >= %.0f%% sparsity (target %.0f%%), e.g. %s: "
                "such layers are all but removed and perplexity usually collapses%s",
                config.allocation, len(hit), len(units), NEAR_TOTAL * 100, config.sparsity * 100, examples, hint)


def _to_nm(allocation: Allocation, pattern: Pattern) -> None:
    """Uniform allocations keep the N:M pattern; non-uniform ones become a per-unit N_i mix."""
    if len(set(round(s, 9) for s in allocation.sparsity)) <= 1:
        allocation.nm_n = [pattern.n] * len(allocation.units)
    else:
        from .allocation.nm import mixed_nm

        sizes = torch.tensor([u.size for u in allocation.units], dtype=torch.float64)
        ns = mixed_nm(torch.tensor(allocation.sparsity, dtype=torch.float64), sizes, pattern.n, pattern.m)
        ns = ns[0] if isinstance(ns, tuple) else ns
        allocation.nm_n = [int(n) for n in ns]
    allocation.nm_m = pattern.m


# --- the allocators -----------------------------------------------------------------------


@register("uniform", description="every block at the target sparsity")
def _uniform(ctx: AllocationContext):
    return [ctx.target] * len(ctx.units), {}


@register("file", description="an explicit per-block or per-linear mapping from a JSON/YAML file")
def _from_file(ctx: AllocationContext):
    mapping = load_mapping(ctx.config.allocation_file)
    out = []
    for unit in ctx.units:
        if unit.name in mapping:
            out.append(mapping[unit.name])
        elif str(unit.block) in mapping:
            out.append(mapping[str(unit.block)])
        else:
            raise ValueError(
                f"allocation file {ctx.config.allocation_file} has no entry for {unit.name} "
                f"(keys are block indices like '{unit.block}' or full names like '{unit.name}')"
            )
    return out, {"file": str(ctx.config.allocation_file)}


def load_mapping(path: Optional[str]) -> dict[str, float]:
    """A JSON/YAML mapping {block index or unit name: sparsity}, or a list with one value per block."""
    file = Path(str(path))
    if not file.is_file():
        raise FileNotFoundError(f"allocation file {file} does not exist")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes a clear message
        raise ValueError(f"allocation file {file} is not valid {file.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if isinstance(raw, list):
        raw = {str(i): v for i, v in enumerate(raw)}
    if not isinstance(raw, dict):
        raise ValueError(f"allocation file {file} must hold a mapping or a list of sparsities")
    try:
        return {str(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"allocation file {file}: every value must be a number ({exc})") from exc


def _als_kwargs(config: PruneConfig) -> dict[str, Any]:
    als = config.als
    return dict(
        delta=als.delta,
        bounds_mode=als.bounds,
        lo=als.s_min,
        hi=als.s_max,
        expression=als.expression,
        solver=als.solver,
        lp_method=als.lp_method,
        granularity=als.granularity,
        qp_lambda=als.qp_lambda,
        strength=als.strength,
    )


@register("als", needs=("features",), description="Adaptive Layer Sparsity: redundancy metric + linear program")
def _als(ctx: AllocationContext):
    from .allocation import als_allocate, als_joint, als_two_stage

    level, kw, data = ctx.config.als.level, _als_kwargs(ctx.config), ctx.data
    if level == "block":
        result = als_allocate(data["block_psi"], ctx.sizes, ctx.target, **kw)
    elif level == "joint":
        result = als_joint(data["linear_psi"], ctx.sizes, ctx.target, **kw)
    else:
        blocks = sorted({u.block for u in ctx.units})
        block_sizes = torch.tensor([sum(u.size for u in ctx.units if u.block == b) for b in blocks], dtype=torch.float64)
        comp_sizes = [torch.tensor([u.size for u in ctx.units if u.block == b], dtype=torch.float64) for b in blocks]
        result = als_two_stage(data["block_psi"], block_sizes, data["component_psis"], comp_sizes, ctx.target, **kw)
    diagnostics = dict(result.diagnostics)
    for key in ("block_psi", "linear_psi"):
        if key in data:
            diagnostics[key.replace("_psi", "_rm")] = data[key].tolist()
    diagnostics["rm_tokens"] = data.get("rm_tokens")
    diagnostics["rm_windows"] = data.get("rm_windows")
    return result.sparsity, diagnostics


@register("owl", needs=("wanda",), description="OWL: less sparsity for blocks with more Wanda outliers")
def _owl(ctx: AllocationContext):
    from .allocation import owl_allocate

    b = ctx.config.baselines
    s = owl_allocate(ctx.data["lod"], ctx.sizes, ctx.target, lam=b.owl_lambda)
    return s, {"lod": ctx.data["lod"].tolist(), "lambda": b.owl_lambda, "M": b.owl_m}


@register("dlp", needs=("wanda",), description="DLP: density from each block's mean Wanda score")
def _dlp(ctx: AllocationContext):
    from .allocation import dlp_allocate

    b = ctx.config.baselines
    s = dlp_allocate(ctx.data["mean_scores"], ctx.sizes, ctx.target, alpha=b.dlp_alpha, score_means=b.dlp_score_means)
    return s, {"mean_scores": ctx.data["mean_scores"].tolist(), "alpha": b.dlp_alpha, "score_means": b.dlp_score_means}


@register("alphapruning", description="AlphaPruning: heavy-tail exponent of each block's weight spectra")
def _alphapruning(ctx: AllocationContext):
    from .allocation import alphapruning_allocate, esd_alpha

    eps = ctx.config.baselines.alpha_eps
    alphas = []
    for block in decoder_blocks(ctx.model):
        with resident(block):
            refs = find_linears(block)
            alphas.append(sum(esd_alpha(ref.weight_oi.detach()) for ref in refs) / len(refs))
    block_alpha = torch.tensor(alphas, dtype=torch.float64)
    return alphapruning_allocate(block_alpha, ctx.sizes, ctx.target, eps=eps), {"alpha": alphas, "eps": eps}


@register("atp", description="ATP: sparsity increasing with depth (arithmetic progression, beta)")
def _atp(ctx: AllocationContext):
    from .allocation import atp_allocate

    beta = ctx.config.baselines.atp_beta
    if beta is None:
        raise ValueError("allocation 'atp' needs a beta: pass atp_beta, or use alsparse.atp.select_beta to pick it")
    return atp_allocate(len(ctx.units), ctx.sizes, ctx.target, beta), {"beta": beta}


@register("search", needs=("features", "wanda"),
          description="searched: evolution over per-block levels on held-out calibration loss, warm-started from the others")
def _search(ctx: AllocationContext):
    found = ctx.data.get("search")
    if found is None:
        raise ValueError("allocation 'search' runs inside prune_ (it needs the model and the calibration windows)")
    return torch.tensor(found["sparsity"], dtype=torch.float64), {}
