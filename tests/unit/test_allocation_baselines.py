"""Baseline allocators (uniform, OWL, DLP, AlphaPruning, ATP) and non-uniform N:M."""

import pytest
import torch

from alsparse.allocation import (
    alphapruning_allocate,
    atp_allocate,
    atp_beta_grid,
    dlp_allocate,
    esd_alpha,
    hill_alpha,
    mixed_nm,
    outlier_ratio,
    owl_allocate,
    uniform,
)


from conftest import seeded as _gen, weighted_mean as _mean  # noqa: E402


SIZES = torch.tensor([4.0, 4.0, 5.0, 6.0, 6.0, 8.0])
STATS = torch.tensor([0.02, 0.07, 0.01, 0.05, 0.03, 0.04])


@pytest.mark.parametrize(
    "allocate",
    [
        lambda stats, sizes, target: owl_allocate(stats, sizes, target),
        lambda stats, sizes, target: dlp_allocate(stats, sizes, target),
        lambda stats, sizes, target: alphapruning_allocate(stats * 100, sizes, target),
        lambda stats, sizes, target: atp_allocate(len(stats), sizes, target, beta=0.02),
    ],
    ids=["owl", "dlp", "alphapruning", "atp"],
)
@pytest.mark.parametrize("target", [0.05, 0.5, 0.7, 0.95])
def test_mean_is_exactly_target_and_in_range(allocate, target):
    s = allocate(STATS, SIZES, target)
    assert s.dtype == torch.float64 and s.shape == (6,)
    assert _mean(s, SIZES) == pytest.approx(target, abs=1e-9)
    assert bool((s >= 0).all() and (s <= 0.99).all())


def test_uniform():
    assert uniform(3, 0.6).tolist() == [0.6, 0.6, 0.6]
    with pytest.raises(ValueError, match="target sparsity"):
        uniform(3, 1.2)


def test_outlier_ratio():
    scores = torch.ones(100)
    scores[:3] = 50.0  # mean = 2.47, threshold 12.35
    assert outlier_ratio(scores) == pytest.approx(0.03)
    assert outlier_ratio([scores[:50], scores[50:]]) == pytest.approx(0.03)
    assert outlier_ratio(torch.ones(10)) == 0.0


def test_owl_direction_scale_and_equal_inputs():
    s = owl_allocate(STATS, torch.ones(6), 0.6, lam=0.08)
    order = torch.argsort(STATS)
    assert bool((s[order][1:] < s[order][:-1]).all())  # more outliers -> less sparsity
    assert float(s.max() - s.min()) == pytest.approx(0.16)  # span 2 lambda
    torch.testing.assert_close(owl_allocate(torch.full((4,), 0.3), torch.ones(4), 0.6), uniform(4, 0.6))


def test_dlp_direction_and_equal_inputs():
    s = dlp_allocate(-STATS, SIZES, 0.7, alpha=0.15)  # |mean| used
    order = torch.argsort(STATS)
    assert bool((s[order][1:] > s[order][:-1]).all())  # the spec's r is a density: larger score -> sparser
    assert float(s.max() - s.min()) == pytest.approx(0.30)
    torch.testing.assert_close(dlp_allocate(torch.full((5,), 2.0), torch.ones(5), 0.7), uniform(5, 0.7))
    flipped = dlp_allocate(STATS, SIZES, 0.7, score_means="importance")
    assert bool((flipped[order][1:] < flipped[order][:-1]).all())
    assert _mean(flipped, SIZES) == pytest.approx(0.7, abs=1e-9)


def test_alphapruning_direction_and_equal_inputs():
    alpha = torch.tensor([2.0, 5.0, 3.0, 4.0])
    s = alphapruning_allocate(alpha, torch.ones(4), 0.5, eps=0.3)
    order = torch.argsort(alpha)
    assert bool((s[order][1:] > s[order][:-1]).all())  # higher alpha -> more sparsity
    torch.testing.assert_close(s, torch.tensor([0.35, 0.65, 0.45, 0.55], dtype=torch.float64))
    equal = alphapruning_allocate(torch.full((3,), 3.0), torch.ones(3), 0.5)
    torch.testing.assert_close(equal, uniform(3, 0.5))


@pytest.mark.parametrize("true_alpha", [2.5, 3.0, 4.0])
def test_hill_alpha_recovers_pareto_exponent(true_alpha):
    uniform01 = torch.rand(5000, generator=_gen(int(true_alpha * 10)), dtype=torch.float64)
    samples = 2.0 * uniform01 ** (-1.0 / (true_alpha - 1.0))  # density ~ x^-alpha above x_min = 2
    assert hill_alpha(samples) == pytest.approx(true_alpha, rel=0.1)


def test_hill_alpha_finds_tail_above_bulk():
    body = torch.rand(3000, generator=_gen(1), dtype=torch.float64) * 0.9 + 0.05
    tail = torch.rand(2000, generator=_gen(2), dtype=torch.float64) ** (-1.0 / 2.0)  # alpha 3, x_min 1
    assert hill_alpha(torch.cat([body, tail]), max_candidates=200) == pytest.approx(3.0, rel=0.1)


def test_esd_alpha_runs_and_heavier_tail_has_lower_alpha():
    gen = _gen(3)
    gaussian = torch.randn(256, 128, generator=gen)
    heavy = gaussian * torch.rand(256, 1, generator=gen) ** -1.0  # row scales with a heavy tail
    a_gauss, a_heavy = esd_alpha(gaussian), esd_alpha(heavy)
    assert a_gauss > 1.0 and a_heavy > 1.0
    assert a_heavy < a_gauss
    with pytest.raises(ValueError, match="matrix"):
        esd_alpha(torch.ones(3))


def test_atp_progression_and_grid():
    s = atp_allocate(5, torch.ones(5), 0.5, beta=0.05)
    torch.testing.assert_close(s, torch.tensor([0.4, 0.45, 0.5, 0.55, 0.6], dtype=torch.float64))
    s = atp_allocate(4, torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, beta=0.03)
    torch.testing.assert_close(s[1:] - s[:-1], torch.full((3,), 0.03, dtype=torch.float64))  # spacing kept
    assert _mean(s, [1, 2, 3, 4]) == pytest.approx(0.5, abs=1e-12)
    grid = atp_beta_grid(8, 0.7, n=6)
    assert grid[0] == 0.0 and grid.numel() == 6
    for beta in grid.tolist():
        s = atp_allocate(8, torch.ones(8), 0.7, beta=beta)
        assert bool((s >= 0).all() and (s <= 0.99).all())
        torch.testing.assert_close(s[1:] - s[:-1], torch.full((7,), beta, dtype=torch.float64))
    assert float(0.7 + grid[-1] * 7 / 2) == pytest.approx(0.99)
    torch.testing.assert_close(atp_allocate(3, torch.ones(3), 0.5, beta=0.0), uniform(3, 0.5))


def test_mixed_nm_balanced_case():
    s = torch.tensor([0.30, 0.45, 0.55, 0.70])
    n, achieved = mixed_nm(s, torch.ones(4), target_n=2, m=4)
    assert n.dtype == torch.int64 and bool((n >= 0).all() and (n <= 3).all())
    assert achieved == pytest.approx(0.5)
    assert n.tolist() == [1, 2, 2, 3]
    n8, achieved8 = mixed_nm(torch.linspace(0.3, 0.7, 8), torch.ones(8), target_n=4, m=8)
    assert achieved8 == pytest.approx(0.5) and bool((n8[1:] >= n8[:-1]).all())


def test_mixed_nm_unequal_sizes_closest_and_deterministic():
    s = torch.tensor([0.1, 0.5, 0.9, 0.6, 0.4])
    sizes = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    n, achieved = mixed_nm(s, sizes, target_n=2, m=4)
    assert bool((n >= 0).all() and (n <= 3).all())
    assert abs(achieved - 0.5) <= float(sizes.max() / sizes.sum()) / 4 / 2 + 1e-12
    assert torch.equal(n, mixed_nm(s, sizes, target_n=2, m=4)[0])
    with pytest.raises(ValueError, match="0 < N < m"):
        mixed_nm(s, sizes, target_n=4, m=4)
