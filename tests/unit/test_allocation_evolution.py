"""The searched allocation's pure parts: level grid, budget-exact mutations, quantised warm starts,
and the (1 + lambda) evolution on planted fitness functions."""

from __future__ import annotations

import random

import pytest

from alsparse.allocation.evolution import (
    EvolutionState,
    LevelGrid,
    Stage,
    check_stages,
    evolve,
    generation_cost,
    is_balanced,
    mutate,
    quantize,
    size_groups,
)


def _mean(offsets, sizes, grid):
    return sum(grid.sparsity(j) * n for j, n in zip(offsets, sizes)) / sum(sizes)


def test_grid_bounds_stay_in_the_box_and_in_zero_one():
    grid = LevelGrid(0.5, 0.05, 0.2)
    assert (grid.lowest, grid.highest) == (-4, 4)
    assert grid.sparsity(-4) == pytest.approx(0.3) and grid.sparsity(4) == pytest.approx(0.7)
    low = LevelGrid(0.1, 0.05, 0.3)
    assert low.sparsity(low.lowest) >= 0 and low.lowest == -2
    high = LevelGrid(0.9, 0.05, 0.3)
    assert high.sparsity(high.highest) <= 0.99
    with pytest.raises(ValueError, match="outside"):
        grid.sparsity(5)
    with pytest.raises(ValueError, match="step"):
        LevelGrid(0.5, 0.3, 0.2)


@pytest.mark.parametrize("sizes", [[10] * 8, [10, 10, 7, 7, 7, 3, 10, 3]])
def test_every_mutation_keeps_the_budget_exact_and_the_grid(sizes):
    grid = LevelGrid(0.6, 0.025, 0.3)
    groups = size_groups(sizes)
    rng = random.Random(0)
    offsets = [0] * len(sizes)
    for _ in range(2000):
        offsets = mutate(offsets, rng, groups, grid, max_flips=4)
        assert is_balanced(offsets, groups)
        assert all(grid.lowest <= j <= grid.highest for j in offsets)
        assert _mean(offsets, sizes, grid) == pytest.approx(0.6, abs=1e-12)
    assert len(set(offsets)) > 2, "the walk went nowhere"


def test_mutation_changes_something_and_is_deterministic_for_a_seed():
    grid, groups = LevelGrid(0.5, 0.05, 0.2), size_groups([5] * 6)
    a = [mutate([0] * 6, random.Random(3), groups, grid) for _ in range(5)]
    b = [mutate([0] * 6, random.Random(3), groups, grid) for _ in range(5)]
    assert a == b and all(child != [0] * 6 for child in a)
    assert mutate([0], random.Random(0), size_groups([5]), grid) == [0], "one unit: nothing to switch"


def test_quantize_is_balanced_and_keeps_the_order():
    grid = LevelGrid(0.5, 0.05, 0.3)
    sizes = [4] * 6
    ratios = [0.31, 0.42, 0.5, 0.55, 0.58, 0.64]  # mean 0.5
    offsets = quantize(ratios, sizes, grid)
    assert is_balanced(offsets, size_groups(sizes))
    assert offsets == sorted(offsets) and offsets[0] < 0 < offsets[-1]
    assert quantize([0.5] * 6, sizes, grid) == [0] * 6
    clipped = quantize([0.0, 1.0, 0.5, 0.5], [4] * 4, grid)  # beyond the box: clamped, still balanced
    assert clipped == [grid.lowest, grid.highest, 0, 0]


def test_stage_rules_are_checked():
    check_stages(8, [Stage(2, 1), Stage(1, 4)], heldout_windows=4)
    assert generation_cost(8, [Stage(2, 1), Stage(1, 4)]) == 8 * 1 + 2 * 4
    for bad in ([Stage(2, 4), Stage(1, 1)], [Stage(1, 1), Stage(2, 4)], [Stage(2, 1)], [Stage(1, 8)]):
        with pytest.raises(ValueError):
            check_stages(8, bad, heldout_windows=4)


def _planted(fragile: int, n: int):
    """Loss grows fast with the fragile unit's level and slowly elsewhere: the optimum prunes the
    fragile unit least, the others a little more."""

    def fitness(candidates, windows, generation):
        return [sum((40.0 if u == fragile else 1.0) * (max(j, -3) + 3) ** 2 for u, j in enumerate(c)) for c in candidates]

    return fitness


def _run(seed, budget, state=None, on_generation=None):
    grid, groups = LevelGrid(0.5, 0.05, 0.3), size_groups([7] * 6)
    fitness = _planted(2, 6)
    if state is None:
        state = EvolutionState([0] * 6, fitness([[0] * 6], [0], 0)[0])
    return evolve(state, fitness, groups, grid, offspring=6, stages=[Stage(2, 1), Stage(1, 2)], budget=budget,
                  seed=seed, windows_for=lambda rng, n: sorted(rng.sample(range(4), n)), on_generation=on_generation)


def test_evolution_improves_a_planted_fitness_protects_the_fragile_unit_and_keeps_the_budget():
    start = _planted(2, 6)([[0] * 6], [0], 0)[0]
    state = _run(seed=0, budget=600)
    assert state.parent_score < start
    assert state.parent[2] == min(state.parent), "the fragile unit is pruned least"
    assert is_balanced(state.parent, [list(range(6))])
    assert state.forwards <= 600 and state.generation == 600 // generation_cost(6, [Stage(2, 1), Stage(1, 2)])
    scores = [t["parent"] for t in state.trace]
    assert scores == sorted(scores, reverse=True), "elitist: the parent never gets worse"


def test_same_seed_same_result_and_a_resumed_run_equals_an_uninterrupted_one():
    a, b = _run(seed=5, budget=400), _run(seed=5, budget=400)
    assert a.parent == b.parent and a.trace == b.trace
    saved = []
    _run(seed=5, budget=200, on_generation=lambda s: saved.append(s.to_dict()))
    resumed = _run(seed=5, budget=400, state=EvolutionState.from_dict(saved[-1]))
    assert resumed.parent == a.parent and resumed.trace == a.trace and resumed.forwards == a.forwards


def test_nm_levels_are_the_mixed_patterns_and_a_searched_mix_maps_back_exactly():
    import torch

    from alsparse.allocation.nm import mixed_nm
    from alsparse.config import Pattern, PruneConfig, SearchOptions
    from alsparse.search import level_grid, level_pattern

    config = PruneConfig(pattern="2:4", allocation="search")
    grid = level_grid(config)  # the default span 0.2 is below one step (0.25): one step each way
    assert grid.offsets() == [-1, 0, 1] and [level_pattern(config, grid, j) for j in grid.offsets()] == [
        (0.25, Pattern(1, 4)), (0.5, Pattern(2, 4)), (0.75, Pattern(3, 4))]
    wide = PruneConfig(pattern="4:8", allocation="search", search=SearchOptions(span=0.45))
    grid = level_grid(wide)
    assert grid.offsets() == [-3, -2, -1, 0, 1, 2, 3]  # 1:8 .. 7:8, never 8:8
    assert level_pattern(PruneConfig(pattern="1:2", allocation="search"), level_grid(
        PruneConfig(pattern="1:2", allocation="search")), -1) == (0.0, Pattern())  # 0:2 is dense
    unstructured = level_grid(PruneConfig(sparsity=0.6, allocation="search"))
    assert (unstructured.step, unstructured.span, unstructured.target) == (0.05, 0.2, 0.6)
    # a searched mix (N_i / M exactly, mean N/M) comes back from the N:M allocation as the same N_i
    ns = [3, 5, 4, 4, 2, 6, 4, 4]
    sparsity = torch.tensor([n / 8 for n in ns], dtype=torch.float64) * 1.0
    counts, achieved = mixed_nm(sparsity, torch.ones(8), target_n=4, m=8)
    assert counts.tolist() == ns and achieved == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # also when the ratios carry float error from arithmetic
        noisy = sparsity + torch.empty(8, dtype=torch.float64).uniform_(-1e-12, 1e-12, generator=g)
        assert mixed_nm(noisy, torch.ones(8), target_n=4, m=8)[0].tolist() == ns
