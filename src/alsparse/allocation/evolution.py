"""The pure part of the searched allocation: a grid of sparsity levels per unit, budget-exact
level-switch mutations and a (1 + lambda) evolution with multi-step selection. No model here:
candidates are integer level offsets, fitness is a callable (alsparse.search supplies the model).

A candidate is one integer offset j_u per unit; unit u is pruned at ``target + j_u * step``. Units
are grouped by size (all decoder blocks of a model are usually one group): a mutation moves one
unit of a group one level up and another unit of the *same* group one level down, so the
size-weighted mean stays the target exactly after every step, whatever the sizes. A warm start
(an allocator's continuous ratios) is quantised to the grid with the same invariant: every group's
offsets sum to zero.

The evolution follows EvoPress (Sieberling et al., ICML 2025; semantics only): each generation
mutates the parent into ``offspring`` children; selection stages score the survivors of the
previous stage on more tokens each (e.g. 16 children on 1 window, the best 2 on 4); the best child
of the last stage replaces the parent only if it beats the parent on those same tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class LevelGrid:
    """Levels ``target + j * step`` for integer j, kept inside [target - span, target + span] and
    [0, max_sparsity]."""

    target: float
    step: float
    span: float
    max_sparsity: float = 0.99

    def __post_init__(self) -> None:
        if not 0 < self.step <= self.span:
            raise ValueError(f"search step must be in (0, span], got step {self.step} with span {self.span}")
        if not 0 < self.span < 1:
            raise ValueError(f"search span must be in (0, 1), got {self.span}")

    @property
    def lowest(self) -> int:
        """The lowest offset (most negative j) allowed."""
        floor = max(0.0, self.target - self.span)
        return -int(math.floor((self.target - floor) / self.step + 1e-9))

    @property
    def highest(self) -> int:
        ceiling = min(self.max_sparsity, self.target + self.span)
        return int(math.floor((ceiling - self.target) / self.step + 1e-9))

    def offsets(self) -> list[int]:
        return list(range(self.lowest, self.highest + 1))

    def sparsity(self, offset: int) -> float:
        if not self.lowest <= offset <= self.highest:
            raise ValueError(f"level offset {offset} is outside [{self.lowest}, {self.highest}]")
        return self.target + offset * self.step


def size_groups(sizes: Sequence[int]) -> list[list[int]]:
    """Unit indices grouped by equal size, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(int(size), []).append(i)
    return list(groups.values())


def is_balanced(offsets: Sequence[int], groups: Sequence[Sequence[int]]) -> bool:
    """Every group's offsets sum to zero: the size-weighted mean sparsity is the target exactly."""
    return all(sum(offsets[i] for i in group) == 0 for group in groups)


def quantize(sparsity: Sequence[float], sizes: Sequence[int], grid: LevelGrid) -> list[int]:
    """The balanced level offsets nearest ``sparsity`` (an allocator's ratios): per group, each unit
    takes floor((s - target) / step) clamped to the grid, then the group's sum is brought to zero by
    moving the units with the largest (or, going down, smallest) remainders one level at a time
    (ties: the lower index). Within a group the mean of the result is the target; the relative order
    of the units' ratios is kept as far as the grid allows."""
    if len(sparsity) != len(sizes):
        raise ValueError(f"{len(sparsity)} ratios for {len(sizes)} units")
    offsets = [0] * len(sizes)
    lo, hi = grid.lowest, grid.highest
    for group in size_groups(sizes):
        raw = {i: (float(sparsity[i]) - grid.target) / grid.step for i in group}
        for i in group:
            offsets[i] = min(hi, max(lo, int(math.floor(raw[i] + 1e-9))))
        rest = {i: raw[i] - offsets[i] for i in group}  # > 0: wants to go up
        total = sum(offsets[i] for i in group)
        while total < 0:
            movable = [i for i in group if offsets[i] < hi]
            i = max(movable, key=lambda k: (rest[k], -k))
            offsets[i] += 1
            rest[i] -= 1
            total += 1
        while total > 0:
            movable = [i for i in group if offsets[i] > lo]
            i = min(movable, key=lambda k: (rest[k], k))
            offsets[i] -= 1
            rest[i] += 1
            total -= 1
    return offsets


def mutate(offsets: Sequence[int], rng: random.Random, groups: Sequence[Sequence[int]], grid: LevelGrid,
           max_flips: int = 3) -> list[int]:
    """A child of ``offsets``: 1..max_flips level switches (uniformly many), each moving one unit one
    level up and another unit of the same size group one level down, both staying on the grid. A
    group with fewer than two units cannot switch; a parent with no possible switch is returned
    unchanged."""
    child = list(offsets)
    lo, hi = grid.lowest, grid.highest
    usable = [g for g in groups if len(g) >= 2]
    flips = rng.randint(1, max(1, max_flips))
    for _ in range(flips):
        options = []
        for group in usable:
            downs = [i for i in group if child[i] > lo]
            ups = [i for i in group if child[i] < hi and any(d != i for d in downs)]
            if ups:
                options.append((ups, downs))
        if not options:
            break
        ups, downs = options[rng.randrange(len(options))]
        up = ups[rng.randrange(len(ups))]
        others = [i for i in downs if i != up]
        down = others[rng.randrange(len(others))]
        child[up] += 1
        child[down] -= 1
    return child


@dataclass(frozen=True)
class Stage:
    """A selection stage: the ``survivors`` best of its candidates, scored on ``windows`` windows;
    ``cost``: the work of scoring one window, in whole-window forwards (a prefix of a quarter of
    the window costs 0.25)."""

    survivors: int
    windows: int
    cost: float = 1.0


# fitness(candidates, windows, stage) -> one score per candidate (lower is better), every candidate
# scored on the same ``windows`` held-out windows; ``stage`` is the selection stage's index
Fitness = Callable[[list[list[int]], list[int], int], list[float]]


@dataclass
class EvolutionState:
    """Everything a resumed search needs: the parent, its score on the final stage's windows, the
    generation reached, the random state, the trace and the work spent (window forwards)."""

    parent: list[int]
    parent_score: float
    generation: int = 0
    rng_state: Optional[list] = None
    forwards: float = 0.0  # whole-window forwards spent
    trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"parent": list(self.parent), "parent_score": self.parent_score, "generation": self.generation,
                "rng_state": self.rng_state, "forwards": self.forwards, "trace": list(self.trace)}

    @classmethod
    def from_dict(cls, data: dict) -> "EvolutionState":
        rng_state = data.get("rng_state")
        if rng_state is not None:  # JSON turned the tuple's inner tuple into a list
            rng_state = [rng_state[0], list(rng_state[1]), rng_state[2]]
        return cls([int(j) for j in data["parent"]], float(data["parent_score"]), int(data["generation"]),
                   rng_state, float(data["forwards"]), list(data["trace"]))


def generation_cost(offspring: int, stages: Sequence[Stage]) -> float:
    """Window forwards one generation spends: every stage scores the previous stage's survivors."""
    cost, alive = 0.0, offspring
    for stage in stages:
        cost += alive * stage.windows * stage.cost
        alive = min(alive, stage.survivors)
    return cost


def check_stages(offspring: int, stages: Sequence[Stage], heldout_windows: int) -> None:
    if offspring < 1:
        raise ValueError(f"search offspring must be >= 1, got {offspring}")
    if not stages:
        raise ValueError("the search needs at least one selection stage")
    for a, b in zip(stages, stages[1:]):
        if b.survivors > a.survivors or b.windows < a.windows:
            raise ValueError("selection stages must keep fewer (or as many) survivors on more (or as many) windows")
    if stages[-1].survivors != 1:
        raise ValueError("the last selection stage keeps exactly one survivor (the child that may replace the parent)")
    if any(s.windows < 1 or s.survivors < 1 for s in stages) or stages[-1].windows > heldout_windows:
        raise ValueError(f"stage windows must be in [1, {heldout_windows}] (the held-out calibration windows)")


def evolve(state: EvolutionState, fitness: Fitness, groups: Sequence[Sequence[int]], grid: LevelGrid, *,
           offspring: int, stages: Sequence[Stage], budget: float, seed: int, max_flips: int = 3,
           windows_for: Callable[[random.Random, int], list[int]],
           on_generation: Optional[Callable[[EvolutionState], None]] = None) -> EvolutionState:
    """Run generations until ``budget`` whole-window forwards are spent (a generation that would overrun
    the budget is not started). ``windows_for(rng, n)`` picks n of the held-out windows for an early
    stage; the last stage always scores on the fixed final windows ``[0, stages[-1].windows)``, the
    ones ``state.parent_score`` is measured on. ``on_generation(state)`` after each (checkpointing).
    Deterministic for a seed and, resumed from a saved state, continues identically."""
    rng = random.Random(seed)
    if state.rng_state is not None:
        rng.setstate((state.rng_state[0], tuple(state.rng_state[1]), state.rng_state[2]))
    per_generation = generation_cost(offspring, stages)
    final = list(range(stages[-1].windows))
    while state.forwards + per_generation <= budget + 1e-9:
        children = [mutate(state.parent, rng, groups, grid, max_flips) for _ in range(offspring)]
        alive = list(range(len(children)))
        scores: list[float] = []
        for k, stage in enumerate(stages):
            windows = final if k == len(stages) - 1 else windows_for(rng, stage.windows)
            scores = fitness([children[i] for i in alive], windows, k)
            state.forwards += len(alive) * stage.windows * stage.cost
            ranked = sorted(range(len(alive)), key=lambda i: (scores[i], alive[i]))[: stage.survivors]
            alive, scores = [alive[i] for i in ranked], [scores[i] for i in ranked]
        best, best_score = children[alive[0]], scores[0]
        accepted = best_score < state.parent_score
        if accepted:
            state.parent, state.parent_score = best, best_score
        state.generation += 1
        state.trace.append({"generation": state.generation, "best_child": best_score,
                            "parent": state.parent_score, "accepted": accepted, "forwards": round(state.forwards, 6)})
        state.rng_state = _rng_state(rng)
        if on_generation is not None:
            on_generation(state)
    state.rng_state = _rng_state(rng)
    return state


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]
