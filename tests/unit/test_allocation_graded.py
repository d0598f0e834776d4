"""Graded ALS (size-weighted QP over min-max normalised importance), the two-stage component level's
global box, and the whole-model rounding of zero counts."""

import pytest
import torch

from alsparse.allocation import als_allocate, als_two_stage
from alsparse.allocation.graded import normalised_importance, solve_graded
from alsparse.allocation.lp import largest_remainder
from alsparse.config import ALSOptions

from conftest import seeded, weighted_mean


def _c(L=12, seed=0):
    return torch.rand(L, generator=seeded(seed), dtype=torch.float64)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_graded_is_interior_exact_mean_and_linear_in_importance(target):
    c, sizes = _c(), torch.ones(12, dtype=torch.float64)
    s_lo, s_hi = torch.full((12,), target - 0.2), torch.full((12,), target + 0.2)
    s = solve_graded(c, sizes, target, s_lo, s_hi, strength=0.1).sparsity
    assert len({round(v, 9) for v in s.tolist()}) > 2  # graded, not a two-valued vertex
    assert weighted_mean(s, sizes) == pytest.approx(target, abs=1e-12)
    c_hat = normalised_importance(c)
    torch.testing.assert_close(s, target - 0.1 * (c_hat - c_hat.mean()))  # unclipped: s = S - t (c_hat - nu)
    assert float(s.max() - s.min()) == pytest.approx(0.1)  # the strength is the spread
    assert int(torch.argmin(s)) == int(torch.argmax(c))  # the most important unit is the least sparse


def test_graded_strength_zero_and_constant_importance_are_uniform_exactly():
    sizes = torch.tensor([1.0, 3.0, 2.0, 5.0], dtype=torch.float64)
    lo, hi = torch.full((4,), 0.4), torch.full((4,), 0.8)
    for c, strength in ((_c(4), 0.0), (torch.full((4,), 0.3, dtype=torch.float64), 0.2)):
        s = solve_graded(c, sizes, 0.6, lo, hi, strength).sparsity
        assert s.tolist() == [0.6] * 4


def test_graded_clips_to_bounds_and_keeps_the_mean_with_unequal_sizes():
    c, sizes = _c(8, seed=3), torch.arange(1.0, 9.0, dtype=torch.float64)
    lo, hi = torch.full((8,), 0.5, dtype=torch.float64), torch.full((8,), 0.7, dtype=torch.float64)
    s = solve_graded(c, sizes, 0.6, lo, hi, strength=0.6).sparsity  # spread wider than the box
    assert bool((s >= 0.5 - 1e-12).all() and (s <= 0.7 + 1e-12).all())
    assert weighted_mean(s, sizes) == pytest.approx(0.6, abs=1e-12)
    assert {round(float(v), 9) for v in s} >= {0.5, 0.7}  # some clipped on each side, the rest graded


def test_graded_ratios_do_not_depend_on_unit_sizes_when_importance_is_flat():
    """The size-weighted objective: a large unit is not pruned harder for being large (the unweighted
    QP gives d_i = center + (c - nu p_i) / (2 lam): unequal even when every c_i is equal)."""
    sizes = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    c = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    s = solve_graded(c, sizes, 0.5, torch.zeros(3), torch.full((3,), 0.9), strength=0.2).sparsity
    assert float(s[0]) == pytest.approx(float(s[2]))  # equal importance, 100x the size: the same ratio


def test_als_graded_needs_a_strength_and_records_it():
    psi = torch.eye(4, dtype=torch.float64) * 0.5 + 0.5
    psi[0, 1] = psi[1, 0] = 0.9
    with pytest.raises(ValueError, match="needs a strength"):
        als_allocate(psi, torch.ones(4), 0.5, solver="graded")
    result = als_allocate(psi, torch.ones(4), 0.5, solver="graded", strength=0.1)
    assert result.diagnostics["strength"] == 0.1 and result.diagnostics["solver"] == "graded"


def test_two_stage_inner_bounds_stay_inside_the_global_box():
    """Stage 1 puts a block at S + delta; its linears used to get [S, S + 2 delta] (0.99 on SmolLM2)."""
    L, K, target, delta = 4, 3, 0.6, 0.2
    block_psi = torch.full((L, L), 0.95, dtype=torch.float64).fill_diagonal_(1.0)
    block_psi[0, 1:] = block_psi[1:, 0] = 0.1  # block 0 unlike the rest: protected, the others at S + delta
    comp_psi = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]], dtype=torch.float64)
    comp_sizes = [torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)] * L
    for solver in ("lp", "graded"):
        result = als_two_stage(block_psi, torch.full((L,), 5.0, dtype=torch.float64), [comp_psi] * L, comp_sizes,
                               target, delta=delta, solver=solver, strength=0.4)
        s = result.sparsity
        assert float(s.max()) <= target + delta + 1e-9 and float(s.min()) >= target - delta - 1e-9, (solver, s)
        assert weighted_mean(s, torch.cat(comp_sizes)) == pytest.approx(target, abs=1e-9)
    assert max(result.diagnostics["block_sparsity"]) > target  # stage 1 really did push blocks up


def test_largest_remainder_hits_the_rounded_total():
    wanted = torch.rand(50, generator=seeded(1), dtype=torch.float64) * 100
    counts = largest_remainder(wanted.tolist(), [1000] * 50)
    assert sum(counts) == round(float(wanted.sum()))
    assert all(int(w) <= k <= int(w) + 1 for w, k in zip(wanted.tolist(), counts))
    assert largest_remainder([2.0, 3.0], [10, 10]) == [2, 3]  # integers stay put


def test_als_options_validate_the_strength():
    assert ALSOptions().solver == "graded" and ALSOptions().strength is None
    with pytest.raises(ValueError, match="strength must be in"):
        ALSOptions(strength=-0.1)
    with pytest.raises(ValueError, match="strength_grid"):
        ALSOptions(strength_grid=())
    with pytest.raises(ValueError, match="als solver"):
        ALSOptions(solver="slsqp")
