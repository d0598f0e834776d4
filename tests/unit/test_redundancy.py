"""Redundancy Metric and the streaming feature summaries."""

import logging

import pytest
import torch

from alsparse.redundancy import FeatureSummary, metric, redundancy_matrix, redundancy_metric, select_tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _summary(x: torch.Tensor, index=None, normalize="center", storage="auto") -> FeatureSummary:
    index = torch.arange(x.shape[0]) if index is None else index
    summary = FeatureSummary(index, normalize=normalize, storage=storage)
    summary.update(x, 0)
    summary.finalize()
    return summary


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H)."""
    x, y = x.double(), y.double()
    m = x.shape[0]
    h = torch.eye(m, dtype=torch.float64) - torch.full((m, m), 1.0 / m, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def _correlated_units(m=300, widths=(8, 12, 20, 6), seed=0) -> list[torch.Tensor]:
    gen = _gen(seed)
    base = torch.randn(m, 10, generator=gen)
    units = []
    for position, width in enumerate(widths):
        mix = torch.randn(10, width, generator=gen)
        noise = torch.randn(m, width, generator=gen) * (0.5 + position)
        units.append(base @ mix + noise + 3.0)  # offset: centering matters
    return units


def test_matrix_symmetric_unit_diagonal_in_range():
    psi = redundancy_matrix([_summary(x) for x in _correlated_units()])
    assert psi.dtype == torch.float64 and psi.shape == (4, 4)
    assert torch.equal(psi, psi.T)
    assert torch.equal(torch.diagonal(psi), torch.ones(4, dtype=torch.float64))
    assert bool(((psi >= 0) & (psi <= 1)).all())
    assert float(psi[0, 3]) < float(psi[0, 1]) < 1.0  # noisier unit 3 is less redundant


def test_centered_rm_equals_linear_cka():
    units = _correlated_units(m=120)
    psi = redundancy_matrix([_summary(x) for x in units])
    for i in range(4):
        for j in range(4):
            assert float(psi[i, j]) == pytest.approx(_linear_cka(units[i], units[j]), abs=1e-6)


def test_metric_invariant_to_scaling_and_identical_is_one():
    x, y = _correlated_units()[:2]
    base = redundancy_metric(x, y)
    assert redundancy_metric(17.0 * x.double(), y) == pytest.approx(base, rel=1e-10)
    assert redundancy_metric(x, x) == pytest.approx(1.0, abs=1e-12)
    psi = redundancy_matrix([_summary(x), _summary(x * 5.0), _summary(y)])
    assert float(psi[0, 1]) == pytest.approx(1.0, abs=1e-6)


def test_metric_feature_and_gram_space_agree():
    gen = _gen(1)
    x, y = torch.randn(20, 3, generator=gen), torch.randn(20, 4, generator=gen)  # feature space
    wide_x, wide_y = torch.randn(6, 40, generator=gen), torch.randn(6, 50, generator=gen)  # Gram space
    for a, b in ((x, y), (wide_x, wide_y)):
        k_a, k_b = a.double() @ a.double().T, b.double() @ b.double().T
        expected = float(torch.sum(k_a * k_b) / (k_a.norm() * k_b.norm()))
        assert redundancy_metric(a, b) == pytest.approx(expected, rel=1e-10)


def test_independent_features_are_near_zero():
    gen = _gen(2)
    x, y = torch.randn(20000, 4, generator=gen), torch.randn(20000, 4, generator=gen)
    psi = redundancy_matrix([_summary(x), _summary(y)])
    assert float(psi[0, 1]) < 0.01


def test_streaming_with_offsets_equals_one_shot():
    x = _correlated_units(m=240)[0].reshape(6, 40, -1)  # [B, T, D]
    index = select_tokens(240, 90, seed=3)
    one_shot = _summary(x, index)
    streamed = FeatureSummary(index)
    offset = 0
    for chunk in (x[:1], x[1:3], x[3:4], x[4:].reshape(-1, x.shape[-1])):
        streamed.update(chunk, offset)
        offset += chunk.reshape(-1, x.shape[-1]).shape[0]
    torch.testing.assert_close(streamed.finalize(), one_shot.matrix, rtol=0, atol=0)


def test_low_precision_input_is_kept_in_float32():
    x = torch.randn(2, 8, 5, generator=_gen(4)).bfloat16()
    summary = FeatureSummary(torch.arange(16), normalize="none", storage="rows")
    summary.update(x, 0)
    assert summary.finalize().dtype == torch.float32
    torch.testing.assert_close(summary.matrix, x.float().reshape(16, 5))


def test_gram_storage_equals_row_storage():
    units = _correlated_units(m=50, widths=(80, 120, 60))  # D > m
    index = select_tokens(50, None, seed=0)
    gram = [_summary(x, index) for x in units]
    rows = [_summary(x, index, storage="rows") for x in units]
    assert all(s.kind == "gram" and s.matrix.shape == (50, 50) for s in gram)
    assert all(s.kind == "rows" for s in rows)
    torch.testing.assert_close(redundancy_matrix(gram), redundancy_matrix(rows), rtol=0, atol=1e-6)


def test_feature_space_gram_space_and_chunking_agree(monkeypatch):
    units = _correlated_units(m=64, widths=(3, 5, 4))  # small widths: feature space is chosen
    rows = redundancy_matrix([_summary(x) for x in units])
    mixed = redundancy_matrix([_summary(units[0], storage="gram")] + [_summary(x) for x in units[1:]])
    monkeypatch.setattr(metric, "_CHUNK_ELEMENTS", 3 * 64 * 5)  # 5 Gram rows per chunk
    chunked = redundancy_matrix([_summary(x, storage="gram") for x in units])
    torch.testing.assert_close(mixed, rows, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked, rows, rtol=0, atol=1e-6)


def test_subsampled_summary_converges_to_exact():
    units = _correlated_units(m=6000)
    exact = redundancy_matrix([_summary(x) for x in units])
    errors = []
    for m in (30, 300, 3000):
        errs = []
        for seed in range(5):
            index = select_tokens(6000, m, seed)
            psi = redundancy_matrix([_summary(x, index) for x in units])
            errs.append(float((psi - exact).abs().max()))
        errors.append(sum(errs) / len(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_select_tokens_exact_and_seeded():
    assert torch.equal(select_tokens(10, None, 0), torch.arange(10))
    assert torch.equal(select_tokens(10, 50, 0), torch.arange(10))
    a, b = select_tokens(1000, 64, 7), select_tokens(1000, 64, 7)
    assert torch.equal(a, b) and a.numel() == 64 and bool((a[1:] > a[:-1]).all())
    assert not torch.equal(a, select_tokens(1000, 64, 8))


def test_normalizations():
    x = _correlated_units()[0]
    centred = _summary(x, storage="rows").matrix
    torch.testing.assert_close(centred.mean(0), torch.zeros(x.shape[1]), rtol=0, atol=1e-5)
    standard = _summary(x, normalize="standardize", storage="rows").matrix
    torch.testing.assert_close(standard.pow(2).mean(0), torch.ones(x.shape[1]), rtol=0, atol=1e-5)
    raw = _summary(x, normalize="none", storage="rows").matrix
    torch.testing.assert_close(raw, x)
    with pytest.raises(ValueError, match="normalize"):
        FeatureSummary(torch.arange(4), normalize="whiten")


def test_constant_unit_gets_zero_with_warning(caplog):
    x = _correlated_units()[0]
    constant = torch.full_like(x, 2.5)
    with caplog.at_level(logging.WARNING):
        psi = redundancy_matrix([_summary(x), _summary(constant)])
    assert float(psi[0, 1]) == 0.0 and float(psi[1, 1]) == 1.0
    assert "all-zero" in caplog.text


def test_finalize_before_all_rows_raises():
    summary = FeatureSummary(torch.tensor([0, 5, 9]))
    summary.update(torch.randn(6, 4), 0)
    with pytest.raises(ValueError, match="1 of 3 missing"):
        summary.finalize()


def test_overlapping_offsets_and_mismatched_tokens_raise():
    summary = FeatureSummary(torch.arange(8))
    summary.update(torch.randn(4, 3), 0)
    with pytest.raises(ValueError, match="already received"):
        summary.update(torch.randn(4, 3), 2)
    a = _summary(torch.randn(8, 3), torch.arange(8))
    b = _summary(torch.randn(10, 3)[:8], torch.arange(8) + 0)
    c = FeatureSummary(torch.arange(1, 9))
    c.update(torch.randn(9, 3), 0)
    c.finalize()
    redundancy_matrix([a, b])
    with pytest.raises(ValueError, match="token_index"):
        redundancy_matrix([a, c])
