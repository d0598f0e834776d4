"""ALS allocation: importance, LP (HiGHS and closed form), QP, rounding, component level."""

import json
import math

import pytest
import torch

from alsparse.allocation import (
    als_allocate,
    als_joint,
    als_two_stage,
    bounds,
    importance,
    round_to_granularity,
    solve_lp,
    solve_qp,
    suffix_mean,
)
from alsparse.registry import UnknownNameError


from conftest import seeded as _gen, weighted_mean as _mean  # noqa: E402


def _banded_psi(L: int, decay: float = 0.3, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Neighbouring units more redundant than distant ones, plus symmetric noise."""
    idx = torch.arange(L, dtype=torch.float64)
    psi = torch.exp(-decay * (idx[:, None] - idx[None, :]).abs())
    extra = torch.rand(L, L, generator=_gen(seed), dtype=torch.float64) * noise
    psi = (psi + (extra + extra.T) / 2).clamp(0, 1)
    return psi.fill_diagonal_(1.0)


def test_importance_formulas_and_weight_norm():
    psi = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]], dtype=torch.float64)
    rho, mu, w = importance(psi)
    torch.testing.assert_close(rho, torch.tensor([0.7, 0.9, 0.6], dtype=torch.float64))
    torch.testing.assert_close(mu, torch.tensor([1.7, 1.9, 1.6], dtype=torch.float64) / 3)
    raw = torch.exp(-rho / mu)
    torch.testing.assert_close(w, raw / raw.max())
    _, _, w_orig = importance(psi, "original")
    torch.testing.assert_close(w_orig, torch.exp(-rho) / torch.exp(-rho).max())
    assert not torch.allclose(w, w_orig)
    assert int(torch.argmax(w)) == 2  # least redundant unit is the most important


def test_importance_no_underflow_for_large_redundancy():
    psi = torch.full((40, 40), 0.99, dtype=torch.float64).fill_diagonal_(1.0)
    psi[0, 1:] = psi[1:, 0] = 0.9
    _, _, w = importance(psi, "original")  # exp(-38.6) underflow-free thanks to log space
    assert float(w.max()) == 1.0 and bool(torch.isfinite(w).all()) and float(w.min()) > 0


def test_suffix_mean():
    expected = torch.tensor([3.0, 11 / 3, 4.5, 6.0], dtype=torch.float64)
    torch.testing.assert_close(suffix_mean(torch.tensor([1.0, 2.0, 3.0, 6.0])), expected)


def test_bounds_relative_clip_and_absolute():
    s_lo, s_hi = bounds(0.9, 3, delta=0.2)
    assert s_lo.tolist() == pytest.approx([0.7] * 3) and s_hi.tolist() == [0.99] * 3
    s_lo, s_hi = bounds(0.1, 2, delta=0.2)
    assert s_lo.tolist() == [0.0, 0.0]
    s_lo, s_hi = bounds(0.5, 2, mode="absolute", lo=[0.1, 0.2], hi=0.8)
    assert s_lo.tolist() == [0.1, 0.2] and s_hi.tolist() == [0.8, 0.8]
    with pytest.raises(ValueError, match="bounds mode"):
        bounds(0.5, 2, mode="percentile")
    with pytest.raises(ValueError, match="lo <= hi"):
        bounds(0.5, 2, mode="absolute", lo=0.6, hi=0.4)


def test_lp_hand_solved_three_units():
    # p = [0.25, 0.25, 0.5]; d in [0.3, 0.7]; budget 0.5. c/p ranks unit 1 > unit 0 > unit 2.
    # All at 0.3 uses 0.3; raise unit 1 (+0.1), unit 0 (+0.1): budget met -> d = [0.7, 0.7, 0.3].
    c, sizes = torch.tensor([0.4, 0.9, 0.6]), torch.tensor([1.0, 1.0, 2.0])
    s_lo, s_hi = bounds(0.5, 3, delta=0.2)
    for method in ("highs", "closed_form"):
        solution = solve_lp(c, sizes, 0.5, s_lo, s_hi, method=method)
        torch.testing.assert_close(solution.sparsity, torch.tensor([0.3, 0.3, 0.7], dtype=torch.float64))
        assert solution.objective == pytest.approx(0.4 * 0.7 + 0.9 * 0.7 + 0.6 * 0.3)
        assert solution.status == "optimal" and solution.method == method


def test_lp_fractional_unit():
    c, sizes = torch.tensor([3.0, 2.0, 1.0]), torch.ones(3)
    s_lo, s_hi = bounds(0.5, 3, delta=0.3)
    for method in ("highs", "closed_form"):
        s = solve_lp(c, sizes, 0.5, s_lo, s_hi, method=method).sparsity
        torch.testing.assert_close(s, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(50))
def test_closed_form_matches_highs(seed):
    gen = _gen(seed)
    L = int(torch.randint(2, 40, (1,), generator=gen))
    c = torch.rand(L, generator=gen, dtype=torch.float64)
    sizes = torch.rand(L, generator=gen, dtype=torch.float64) * 9 + 1
    target = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 0.8 + 0.05
    s_lo = (target - torch.rand(L, generator=gen, dtype=torch.float64) * 0.3).clamp(min=0)
    s_hi = (target + torch.rand(L, generator=gen, dtype=torch.float64) * 0.3).clamp(max=0.99)
    highs = solve_lp(c, sizes, target, s_lo, s_hi, "highs")
    closed = solve_lp(c, sizes, target, s_lo, s_hi, "closed_form")
    assert closed.objective == pytest.approx(highs.objective, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(closed.sparsity, highs.sparsity, rtol=0, atol=1e-9)  # no ties (continuous c)
    for solution in (highs, closed):
        assert _mean(solution.sparsity, sizes) == pytest.approx(target, abs=1e-9)
        assert bool((solution.sparsity >= s_lo - 1e-12).all() and (solution.sparsity <= s_hi + 1e-12).all())


def test_closed_form_ties_same_objective_deterministic():
    c, sizes = torch.ones(6, dtype=torch.float64), torch.ones(6)
    s_lo, s_hi = bounds(0.5, 6, delta=0.2)
    closed = solve_lp(c, sizes, 0.5, s_lo, s_hi, "closed_form")
    highs = solve_lp(c, sizes, 0.5, s_lo, s_hi, "highs")
    assert closed.objective == pytest.approx(highs.objective)
    assert closed.sparsity.tolist() == pytest.approx([0.3, 0.3, 0.3, 0.7, 0.7, 0.7])  # lowest index first


def test_lp_infeasible_names_target_and_range():
    with pytest.raises(ValueError, match=r"target sparsity 0.9 is infeasible.*\[0.3, 0.7\]"):
        solve_lp(torch.ones(3), torch.ones(3), 0.9, torch.full((3,), 0.3), torch.full((3,), 0.7))
    with pytest.raises(UnknownNameError, match="closed_form"):
        solve_lp(torch.ones(3), torch.ones(3), 0.5, torch.full((3,), 0.3), torch.full((3,), 0.7), "simplex")


def test_als_equal_sizes_is_bang_bang_and_budget_exact():
    L, target, delta = 12, 0.6, 0.2
    result = als_allocate(_banded_psi(L), torch.ones(L), target, delta=delta)
    s = result.sparsity
    assert _mean(s, torch.ones(L)) == pytest.approx(target, abs=1e-9)
    at_bound = (s - (target - delta)).abs().lt(1e-9) | (s - (target + delta)).abs().lt(1e-9)
    assert int((~at_bound).sum()) <= 1
    json.dumps(result.diagnostics)
    assert result.diagnostics["status"] == "optimal" and len(result.diagnostics["c"]) == L


def test_less_redundant_units_get_less_sparsity():
    psi = torch.full((6, 6), 0.8, dtype=torch.float64).fill_diagonal_(1.0)
    psi[3, :] = psi[:, 3] = 0.1  # unit 3 carries independent information
    psi[3, 3] = 1.0
    for solver in ("lp", "qp"):
        s = als_allocate(psi, torch.ones(6), 0.5, solver=solver).sparsity
        assert float(s[3]) == pytest.approx(float(s.min())) and float(s[3]) < 0.5
        assert float(s[3]) < float(s[0])  # the redundant units before it are pruned harder
    # c is a suffix mean, so the units after the independent one get the least c and most sparsity
    s = als_allocate(psi, torch.ones(6), 0.5, solver="qp").sparsity
    assert int(torch.argmin(s)) == 3 and bool((s[4:] > s[3]).all())


def test_qp_interior_budget_and_agrees_with_slsqp():
    L, sizes = 10, torch.linspace(1, 3, 10)
    _, _, w = importance(_banded_psi(L, seed=3))
    c, (s_lo, s_hi) = suffix_mean(w), bounds(0.5, L)
    closed = solve_qp(c, sizes, 0.5, s_lo, s_hi, lam=8.0)
    slsqp = solve_qp(c, sizes, 0.5, s_lo, s_hi, lam=8.0, method="slsqp")
    assert _mean(closed.sparsity, sizes) == pytest.approx(0.5, abs=1e-12)
    interior = (closed.sparsity > s_lo + 1e-6) & (closed.sparsity < s_hi - 1e-6)
    assert int(interior.sum()) >= L - 1
    assert len(set(round(v, 6) for v in closed.sparsity.tolist())) > 2  # not bang-bang
    torch.testing.assert_close(closed.sparsity, slsqp.sparsity, rtol=0, atol=1e-6)
    assert closed.objective >= slsqp.objective - 1e-10


def test_qp_with_active_bounds_agrees_with_slsqp():
    c, sizes = torch.tensor([5.0, 0.1, 0.2, 0.15, 4.0]), torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0])
    s_lo, s_hi = bounds(0.5, 5, delta=0.1)
    closed = solve_qp(c, sizes, 0.5, s_lo, s_hi, lam=2.0)
    slsqp = solve_qp(c, sizes, 0.5, s_lo, s_hi, lam=2.0, method="slsqp")
    assert float(closed.sparsity[0]) == pytest.approx(0.4)  # clipped at its lower bound
    torch.testing.assert_close(closed.sparsity, slsqp.sparsity, rtol=0, atol=1e-6)
    assert _mean(closed.sparsity, sizes) == pytest.approx(0.5, abs=1e-12)


def test_round_to_granularity_grid_and_exact_mean():
    gen = _gen(5)
    for sizes in (torch.ones(16), torch.rand(16, generator=gen, dtype=torch.float64) + 0.5):
        s_lo, s_hi = bounds(0.55, 16)
        c = torch.rand(16, generator=gen, dtype=torch.float64)
        raw = solve_qp(c, sizes, 0.55, s_lo, s_hi, lam=8.0).sparsity
        s = round_to_granularity(raw, sizes, 0.55, g=0.005, s_lo=s_lo, s_hi=s_hi)
        assert _mean(s, sizes) == pytest.approx(0.55, abs=1e-9)
        off_grid = [v for v in s.tolist() if abs(v / 0.005 - round(v / 0.005)) > 1e-6]
        assert len(off_grid) <= 1
        assert bool((s >= s_lo - 1e-12).all() and (s <= s_hi + 1e-12).all())
        assert float((s - raw).abs().max()) < 0.02


def test_als_allocate_with_granularity_and_original_expression():
    psi, sizes = _banded_psi(10, seed=7), torch.ones(10)
    qp = als_allocate(psi, sizes, 0.5, solver="qp", granularity=0.01)
    assert _mean(qp.sparsity, sizes) == pytest.approx(0.5, abs=1e-9)
    assert sum(abs(v / 0.01 - round(v / 0.01)) > 1e-6 for v in qp.sparsity.tolist()) <= 1
    modified = als_allocate(psi, sizes, 0.5, expression="modified")
    original = als_allocate(psi, sizes, 0.5, expression="original")
    assert modified.diagnostics["w"] != original.diagnostics["w"]
    assert original.diagnostics["expression"] == "original"


def test_two_stage_block_budgets_and_joint():
    L, K = 4, 3
    block_psi = _banded_psi(L, seed=1)
    component_sizes = [torch.tensor([1.0, 1.0, 3.0]) * (i + 1) for i in range(L)]
    component_psis = [_banded_psi(K, decay=0.5 + i, seed=10 + i) for i in range(L)]
    block_sizes = torch.stack([sizes.sum() for sizes in component_sizes])
    result = als_two_stage(block_psi, block_sizes, component_psis, component_sizes, 0.6, delta=0.15)
    s = result.sparsity
    all_sizes = torch.cat(component_sizes)
    assert s.shape == (L * K,)
    assert _mean(s, all_sizes) == pytest.approx(0.6, abs=1e-9)
    block_s = torch.tensor(result.diagnostics["block_sparsity"], dtype=torch.float64)
    for i in range(L):
        assert _mean(s[i * K : (i + 1) * K], component_sizes[i]) == pytest.approx(float(block_s[i]), abs=1e-9)
        assert bool((s[i * K : (i + 1) * K] - block_s[i]).abs().le(0.15 + 1e-9).all())
    json.dumps(result.diagnostics)
    joint = als_joint(_banded_psi(L * K, seed=2), all_sizes, 0.6, solver="qp")
    assert _mean(joint.sparsity, all_sizes) == pytest.approx(0.6, abs=1e-9)
    with pytest.raises(ValueError, match="sum of its linears"):
        als_two_stage(block_psi, block_sizes + 1, component_psis, component_sizes, 0.6)


def test_als_rejects_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        als_allocate(torch.ones(3, 4), torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="sizes must have 3"):
        als_allocate(torch.eye(3), torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="positive"):
        als_allocate(torch.eye(3), torch.tensor([1.0, 0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="solver"):
        als_allocate(torch.eye(3), torch.ones(3), 0.5, solver="milp")
    with pytest.raises(ValueError, match="target sparsity"):
        als_allocate(torch.eye(3), torch.ones(3), 1.0)
    dense = als_allocate(torch.eye(3), torch.ones(3), 0.0).sparsity
    assert math.isclose(_mean(dense, torch.ones(3)), 0.0, abs_tol=1e-12)
