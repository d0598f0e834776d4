"""Pruning math pinned on hand-checkable tensors, and contracts over every registered pruner."""

from __future__ import annotations

import pytest
import torch

from alsparse.config import Pattern
from alsparse.pruning import PRUNERS, InputStats
from alsparse.pruning import functional as F

W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [8.0, 7.0, 6.0, 5.0]])  # [O=2, I=4]


def _stats(weight, x):
    stats = InputStats(weight.shape[1], "cpu", norms=True, hessian=True)
    stats.update(x)
    return stats


def test_per_row_and_per_matrix_masks_differ_on_the_hand_example():
    per_row = F.score_mask(W.abs(), 0.5, Pattern(), per_row=True)
    per_matrix = F.score_mask(W.abs(), 0.5, Pattern(), per_row=False)
    assert per_row.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert per_matrix.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_exact_counts_with_ties_use_a_stable_order():
    tied = torch.ones(3, 10)
    mask = F.score_mask(tied, 0.55, Pattern(), per_row=True)
    # floor(0.55 * 30) = 16 over the matrix, not all tied entries: 5 per row, the extra one to row 0
    assert mask.sum(dim=1).tolist() == [6, 5, 5]
    assert mask[:, :5].all() and not mask[:, 6:].any() and mask[:, 5].tolist() == [True, False, False]
    whole = F.score_mask(tied, 0.3, Pattern(), per_row=False)
    assert int(whole.sum()) == 9


@pytest.mark.parametrize("s,group,k", [(0.3, 10, 3), (0.5, 7, 3), (0.7, 100, 70), (0.0, 5, 0), (0.999, 4, 3)])
def test_num_pruned_is_floor(s, group, k):
    assert F.num_pruned(s, group) == k


def test_nm_mask_exact_per_group():
    scores = torch.arange(16.0).flip(0).reshape(2, 8)
    mask = F.nm_mask(scores, 2, 4)
    assert mask.reshape(-1, 4).sum(dim=1).tolist() == [2, 2, 2, 2]
    assert mask[0].tolist() == [False, False, True, True, False, False, True, True]
    with pytest.raises(ValueError, match="divisible by 4"):
        F.nm_mask(torch.ones(2, 6), 2, 4)


def test_wanda_equals_per_row_magnitude_when_input_norms_are_equal():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    wanda = PRUNERS.get("wanda").prune(w, _stats(w, torch.ones(5, 32)), 0.5, Pattern())
    per_row = F.apply_prune_mask(w, F.score_mask(w.abs(), 0.5, Pattern(), per_row=True))
    assert torch.equal(wanda, per_row)


def test_wanda_uses_input_norms():
    w = torch.ones(1, 4)
    x = torch.tensor([[1.0, 10.0, 0.1, 5.0]])
    out = PRUNERS.get("wanda").prune(w, _stats(w, x), 0.5, Pattern())
    assert out.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_sparsegpt_with_identity_hessian_equals_per_matrix_magnitude():
    torch.manual_seed(0)
    w = torch.randn(12, 64)  # in_features <= block size: one column block = the whole matrix
    stats = InputStats(64, "cpu", norms=False, hessian=True)
    stats.xtx = torch.eye(64) * 0.5
    stats.tokens = 1  # H = 2/1 * 0.5 I = I
    out = PRUNERS.get("sparsegpt").prune(w, stats, 0.5, Pattern(), blocksize=128, damp=0.01)
    magnitude = PRUNERS.get("magnitude").prune(w, None, 0.5, Pattern())
    torch.testing.assert_close(out, magnitude)


def test_sparsegpt_reconstructs_better_than_magnitude_on_correlated_inputs():
    torch.manual_seed(0)
    base = torch.randn(2048, 8)
    x = base @ torch.randn(8, 64) + 0.05 * torch.randn(2048, 64)  # strongly correlated inputs
    w = torch.randn(32, 64)
    stats = _stats(w, x)
    err = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        pruned = PRUNERS.get(name).prune(w, stats, 0.5, Pattern(), blocksize=16)
        err[name] = torch.linalg.norm(x @ (w - pruned).T).item()
    assert err["sparsegpt"] < err["magnitude"]
    assert err["sparsegpt"] < err["wanda"]


def test_sparsegpt_dead_inputs_are_zeroed_and_counts_exact():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 3] = 0  # a dead input feature
    w = torch.randn(8, 32)
    out = PRUNERS.get("sparsegpt").prune(w, _stats(w, x), 0.25, Pattern(), blocksize=8)
    assert torch.all(out[:, 3] == 0)
    assert torch.isfinite(out).all()
    for start in range(0, 32, 8):  # exact count per column block, dead column included
        assert int((out[:, start : start + 8] == 0).sum()) >= F.num_pruned(0.25, 64)


def test_sparsegpt_non_pd_hessian_raises_clear_error():
    stats = InputStats(4, "cpu", norms=False, hessian=True)
    stats.xtx = -torch.eye(4)
    stats.tokens = 1
    with pytest.raises(ValueError, match="positive definite"):
        PRUNERS.get("sparsegpt").prune(torch.randn(2, 4), stats, 0.5, Pattern())


@pytest.mark.parametrize("name", PRUNERS.names())
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruner_contract(name, pattern, dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 64).to(dtype)
    original = w.clone()
    x = torch.randn(128, 64)
    pat = Pattern.parse(pattern)
    out = PRUNERS.get(name).prune(w, _stats(w, x), 0.5, pat)
    assert out.shape == w.shape and out.dtype == w.dtype and out.device == w.device
    assert torch.equal(w, original), "the input weight must not be mutated"
    zeros = out == 0
    if pat.is_nm:
        assert torch.all(zeros.reshape(-1, pat.m).sum(dim=1) >= pat.n)
    else:
        assert zeros.float().mean().item() >= 0.5 - 1e-9
        assert zeros.float().mean().item() <= 0.5 + 0.02


def test_input_stats_are_independent_of_microbatch_order():
    """float64 accumulation of float32 per-micro-batch sums: any order (or split over data-parallel
    processes) gives the same float32 statistics, bit for bit."""
    parts = torch.randn(6, 4, 8, 16, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 6).view(
        6, 1, 1, 1)
    forward, backward = (InputStats(16, "cpu", norms=True, hessian=True) for _ in range(2))
    for p in parts:
        forward.update(p)
    halves = [InputStats(16, "cpu", norms=True, hessian=True) for _ in range(2)]
    for i in reversed(range(6)):
        backward.update(parts[i])
        halves[i % 2].update(parts[i])
    gathered, other = halves[0], iter([halves[1]._sq, halves[1].xtx, torch.tensor([96.0], dtype=torch.float64)])
    gathered.reduce_(lambda t: t.add_(next(other)))  # an all-reduce over two processes, by hand
    for stats in (backward, gathered):
        assert stats.tokens == forward.tokens == 192
        assert torch.equal(stats.sq_norms, forward.sq_norms) and torch.equal(stats.hessian, forward.hessian)


def test_input_stats_accumulate_in_fp32_across_microbatches():
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    one = InputStats(8, "cpu", norms=True, hessian=True)
    one.update(x)
    many = InputStats(8, "cpu", norms=True, hessian=True)
    for part in x.split(1):
        many.update(part)
    assert one.tokens == many.tokens == 15
    assert one.sq_norms.dtype == torch.float32
    torch.testing.assert_close(one.sq_norms, many.sq_norms)
    torch.testing.assert_close(one.hessian, many.hessian)


def test_pattern_parsing():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    assert str(Pattern.parse("unstructured")) == "unstructured"
    for bad in ("4:4", "5:4", "2-4", "0:4", "1:1"):
        with pytest.raises(ValueError, match="N:M"):
            Pattern.parse(bad)


@pytest.mark.parametrize("rows,cols,k", [(3, 5, 7), (4, 6, 0), (4, 6, 24), (5, 7, 13)])
def test_per_row_mask_prunes_exactly_k_spread_over_rows(rows, cols, k):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(k))
    prune_mask = F.per_row_mask(scores, k)
    per_row = prune_mask.sum(dim=1)
    assert int(per_row.sum()) == k and int(per_row.max() - per_row.min()) <= 1
    for r in range(rows):  # each row prunes its own lowest entries
        kept, pruned = scores[r][~prune_mask[r]], scores[r][prune_mask[r]]
        if len(kept) and len(pruned):
            assert float(pruned.max()) <= float(kept.min())


def test_per_row_extra_weights_go_to_the_rows_whose_next_score_is_lowest():
    scores = torch.tensor([[1.0, 9.0], [2.0, 3.0], [4.0, 5.0]])  # floor(4/3) = 1 each, 1 extra
    prune_mask = F.per_row_mask(scores, 4)
    assert prune_mask.tolist() == [[True, False], [True, True], [True, False]]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("shape", [(7, 13), (24, 200)])
def test_pruners_prune_exactly_round_s_numel(method, shape):
    """s = k / numel prunes exactly k whatever the width: no per-row or per-block floor loss."""
    from alsparse.pruning import PRUNERS
    from alsparse.pruning.stats import InputStats

    torch.manual_seed(0)
    weight = torch.randn(*shape)
    stats = InputStats(shape[1], "cpu", norms=True, hessian=True)
    stats.update(torch.randn(64, shape[1]))
    for k in (1, shape[0] * shape[1] * 3 // 5 + 1, shape[0] * shape[1] - 1):
        new = PRUNERS.get(method).prune(weight, stats, k / weight.numel(), Pattern(), blocksize=8)
        assert int((new == 0).sum()) == k, (method, shape, k)


def test_sparsegpt_inverse_factor_matches_the_reference_sequence():
    # ours: chol of the flipped H and one triangular solve; the reference code's: cholesky_inverse
    # then a second Cholesky. Same upper factor U of H^-1 = U^T U, to float rounding.
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    H = x.T @ x
    damped = H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    ours = F._inverse_cholesky_upper(H, 0.01)
    assert torch.equal(ours, ours.triu()) and bool((torch.diag(ours) > 0).all())
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours.T @ ours @ damped, torch.eye(64), atol=1e-3)


def test_sparsegpt_reuses_the_prepared_hessian_across_ratios(monkeypatch):
    torch.manual_seed(1)
    stats = InputStats(32, "cpu", norms=False, hessian=True)
    stats.update(torch.randn(128, 32))
    weight = torch.randn(16, 32)
    calls = []
    real = F.prepare_hessian
    monkeypatch.setattr(F, "prepare_hessian", lambda h, d: (calls.append(d), real(h, d))[1])
    pruner, pattern = PRUNERS.get("sparsegpt"), Pattern.parse("unstructured")
    pruned = {s: pruner.prune(weight, stats, s, pattern) for s in (0.3, 0.5, 0.7)}
    assert calls == [0.01], "one inverse for three ratios"
    for s, w in pruned.items():
        assert torch.equal(w, F.sparsegpt(weight, stats.hessian, s, pattern)), s
    calls.clear()
    stats.update(torch.randn(8, 32))  # new statistics: prepared again
    pruner.prune(weight, stats, 0.5, pattern)
    pruner.prune(weight, stats, 0.6, pattern)
    assert calls == [0.01]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_at_several_levels_equals_one_prune_per_level(method):
    """prune_levels (one score sort shared by every level for the mask pruners) gives exactly the
    tensors of separate prune calls, unstructured and N:M, on weights with many ties."""
    g = torch.Generator().manual_seed(5)
    weight = (torch.randint(-4, 5, (24, 32), generator=g) / 4.0)  # few distinct values: ties everywhere
    x = torch.randn(64, 32, generator=g)
    stats = InputStats(32, torch.device("cpu"), norms=True, hessian=True)
    stats.update(x)
    pruner = PRUNERS.get(method)
    for levels in ([(s, Pattern()) for s in (0.1, 0.35, 0.5, 0.501, 0.75, 0.9)],
                   [(n / 8, Pattern(n, 8)) for n in (1, 3, 4, 5, 7)]):
        together = list(pruner.prune_levels(weight, stats, levels))
        apart = [pruner.prune(weight, stats, s, p) for s, p in levels]
        assert len(together) == len(levels)
        for a, b in zip(together, apart):
            assert torch.equal(a, b)
