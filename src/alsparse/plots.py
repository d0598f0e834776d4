"""Figures like the ALS paper's: the RM heat map and the per-unit allocation (matplotlib, PNG)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rm_heatmap(rm: list[list[float]], path: Path, title: str = "Redundancy Metric between blocks") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.6), dpi=110)
    image = ax.imshow(rm, cmap="viridis", vmin=0, vmax=1, origin="upper")
    ax.set_xlabel("unit j")
    ax.set_ylabel("unit i")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="RM(i, j)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def allocation_bars(units: list[str], sparsity: list[float], target: float, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.18 * len(units) + 2), 3.4), dpi=110)
    ax.bar(range(len(units)), sparsity, color="tab:blue", label="allocated sparsity")
    ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.2f}")
    ax.set_xlabel("block" if len(units) < 200 else "unit")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def component_heatmap(report, path: Path) -> Optional[Path]:
    """Blocks x linears grid of allocated sparsity (component-level allocations)."""
    plt = _pyplot()
    names = sorted({r.name.split(f".{r.block}.", 1)[1] for r in report.linears}, key=_linear_order)
    grid = [[float("nan")] * len(names) for _ in range(report.num_blocks)]
    for r in report.linears:
        grid[r.block][names.index(r.name.split(f".{r.block}.", 1)[1])] = r.allocated
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2.5, 0.16 * report.num_blocks + 1.8), dpi=110)
    image = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(names)), [n.split(".")[-1] for n in names], rotation=45, ha="right")
    ax.set_ylabel("block")
    ax.set_title("allocated sparsity per linear", fontsize=10)
    fig.colorbar(image, ax=ax, label="sparsity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def search_fitness_curve(record: dict, path: Path) -> Path:
    """The searched allocation's parent fitness per generation (and each generation's best child),
    with the warm starts' fitness as reference lines."""
    plt = _pyplot()
    trace = record.get("trace", [])
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=110)
    if trace:
        gens = [t["generation"] for t in trace]
        ax.plot(gens, [t["best_child"] for t in trace], ".", color="tab:gray", markersize=3, label="best child")
        ax.step(gens, [t["parent"] for t in trace], where="post", color="tab:blue", label="parent")
    for warm, color in zip(sorted(record.get("warm_starts", []), key=lambda w: w["fitness"])[:3],
                           ("tab:green", "tab:orange", "tab:purple")):
        ax.axhline(warm["fitness"], color=color, linestyle=":", linewidth=1, label=warm["name"])
    ax.set_xlabel("generation")
    ax.set_ylabel(f"held-out calibration {record.get('fitness', 'loss')}")
    ax.set_title("searched allocation: fitness", fontsize=10)
    return _finish(plt, fig, ax, path)


def search_allocations(record: dict, path: Path, target: float) -> Path:
    """The found per-block sparsity beside the start and the best ALS warm start."""
    plt = _pyplot()
    step = record["grid"]["step"]
    found = [target + j * step for j in record["offsets"]]
    lines = [("searched", found, "tab:blue")]
    warm = {w["name"]: w for w in record.get("warm_starts", [])}
    if record.get("start") in warm and record["start"] != "uniform":
        lines.append((f"start: {record['start']}", warm[record["start"]]["sparsity"], "tab:orange"))
    als = [w for w in record.get("warm_starts", []) if w["name"].startswith("als(")]
    if als:
        best = min(als, key=lambda w: w["fitness"])
        lines.append((best["name"], best["sparsity"], "tab:green"))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.18 * len(found) + 2), 3.4), dpi=110)
    for label, values, color in lines:
        ax.plot(range(len(values)), values, marker="o", markersize=3, color=color, label=label)
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title("searched allocation beside its start and ALS", fontsize=10)
    return _finish(plt, fig, ax, path)


def _finish(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _linear_order(name: str) -> int:
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    leaf = name.split(".")[-1]
    return order.index(leaf) if leaf in order else len(order)


def write_plots(report, out_dir: Path) -> list[Path]:
    """All figures that apply to this report; skipped with a log line if matplotlib is missing."""
    try:
        _pyplot()
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'alsparse[plots]')")
        return []
    out_dir = Path(out_dir)
    written = []
    alloc = report.allocation
    diag = alloc.get("diagnostics", {})
    name = report.config.get("allocation")
    for key, title in (("block_rm", "RM between blocks"), ("linear_rm", "RM between linears")):
        if diag.get(key):
            written.append(rm_heatmap(diag[key], out_dir / f"{key.replace('_rm', '')}_rm.png", title))
    blocks = report.per_block()
    written.append(
        allocation_bars(
            [str(b["block"]) for b in blocks],
            [b["allocated"] for b in blocks],
            report.target_sparsity,
            out_dir / "allocation.png",
            f"{name} allocation, {report.config.get('method')}, mean {report.allocated_sparsity:.3f}",
        )
    )
    if len(alloc.get("units", [])) > report.num_blocks:
        written.append(component_heatmap(report, out_dir / "allocation_linears.png"))
    if diag.get("search"):
        written.append(search_fitness_curve(diag["search"], out_dir / "search_fitness.png"))
        written.append(search_allocations(diag["search"], out_dir / "search_allocation.png", report.target_sparsity))
    return written
