"""Every registered allocator (and ALS level) on tiny models: exact mean, achieved == allocated,
deterministic masks. A new allocator inherits these tests by being registered."""

from __future__ import annotations

import json

import pytest
import torch

from alsparse.allocate import ALLOCATORS
from alsparse.api import prune_
from alsparse.config import ALSOptions, BaselineOptions, PruneConfig
from conftest import make_tiny

CASES = [(name, "block") for name in ALLOCATORS.names()] + [("als", "component"), ("als", "joint")]


def _config(name, level, tmp_path, method="wanda", sparsity=0.5, pattern="unstructured", **als):
    file = None
    if name == "file":
        file = tmp_path / "alloc.json"
        file.write_text(json.dumps({"0": 0.3, "1": 0.6, "2": 0.6, "3": 0.5}))
    return PruneConfig(
        method=method, sparsity=sparsity, pattern=pattern, allocation=name, allocation_file=str(file) if file else None,
        als=ALSOptions(level=level, tokens=48, **als), baselines=BaselineOptions(atp_grid=3),
    )


@pytest.mark.parametrize("name,level", CASES)
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gemma2"])
def test_allocator_contract(name, level, family, tmp_path):
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    hashes = []
    for _ in range(2):
        model = make_tiny(family)
        report = prune_(model, ids, _config(name, level, tmp_path))
        hashes.append([r.mask_sha256 for r in report.linears])
        alloc = report.allocation
        if name != "file":  # a hand-written mapping need not average to the target
            assert alloc["mean_sparsity"] == pytest.approx(0.5, abs=1e-6)
            assert report.allocated_sparsity == pytest.approx(0.5, abs=1e-6)
        for rec in report.linears:  # every linear prunes exactly its (whole-model rounded) count
            assert rec.achieved == rec.allocated, rec.name
    assert hashes[0] == hashes[1], "same seed and inputs must give bit-identical masks"


@pytest.mark.parametrize("name,level", CASES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family,sparsity", [("llama", 0.6), ("opt", 0.7)])
def test_achieved_sparsity_is_the_target(name, level, method, family, sparsity, tmp_path):
    """Size-weighted achieved == target within 1e-4 for every allocator x pruner, on widths (32, 64)
    that no per-row floor divides at these targets (0.6 * 32 = 19.2): the remainder of the rounding
    is spread over rows, column blocks and linears."""
    if name == "file":
        pytest.skip("a hand-written mapping need not average to the target")
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    report = prune_(make_tiny(family), ids, _config(name, level, tmp_path, method=method, sparsity=sparsity))
    assert abs(report.achieved_sparsity - sparsity) <= 1e-4, report.achieved_sparsity
    assert abs(report.allocated_sparsity - sparsity) <= 1e-4


@pytest.mark.parametrize("name,level", [("als", "block"), ("als", "component"), ("owl", "block")])
def test_mixed_nm_reports_the_mix_and_keeps_the_mean(name, level, tmp_path):
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny("llama")
    report = prune_(model, ids, _config(name, level, tmp_path, pattern="4:8"))
    nm = report.allocation["nm"]
    assert nm["m"] == 8 and sum(nm["mix"].values()) == len(report.allocation["units"])
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    for rec in report.linears:  # every unit is exactly its own N:8
        n = int(round(rec.allocated * 8))
        assert rec.pattern == (f"{n}:8" if n else "unstructured")
        assert rec.achieved == pytest.approx(n / 8, abs=1e-12)


def test_als_allocation_is_non_uniform_and_reported(tmp_path):
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny("llama")
    report = prune_(model, ids, _config("als", "block", tmp_path, strength=0.1))  # the search may pick 0 here
    diag = report.allocation["diagnostics"]
    assert len(set(round(s, 6) for s in report.allocation["sparsity"])) > 1
    for key in ("rho", "mu", "w", "c", "block_rm"):
        assert key in diag, key
    rm = torch.tensor(diag["block_rm"])
    assert torch.allclose(rm, rm.T) and torch.allclose(rm.diagonal(), torch.ones(3, dtype=rm.dtype))
    assert {"capture", "pass1", "allocation", "prune"} <= set(report.timings_s)


def test_a_unit_allocated_near_total_sparsity_is_warned_about(tmp_path, caplog):
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    file = tmp_path / "alloc.json"
    for mapping, warned in (({"0": 0.3, "1": 0.97, "2": 0.5}, True), ({"0": 0.3, "1": 0.9, "2": 0.5}, False)):
        file.write_text(json.dumps(mapping))
        caplog.clear()
        with caplog.at_level("WARNING", logger="alsparse.allocate"):
            prune_(make_tiny("llama"), ids, PruneConfig(method="magnitude", sparsity=0.5, allocation="file",
                                                         allocation_file=str(file)))
        text = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        assert ("units at >= 95% sparsity" in text) == warned, text
        if warned:
            assert "1 of 3 units" in text and "model.layers.1 0.97" in text


def test_allocation_file_missing_entry_is_clear(tmp_path):
    file = tmp_path / "a.yaml"
    file.write_text("0: 0.5\n1: 0.5\n")
    cfg = PruneConfig(allocation="file", allocation_file=str(file))
    with pytest.raises(ValueError, match="no entry for model.layers.2"):
        prune_(make_tiny("llama"), torch.randint(1, 96, (2, 8)), cfg)


def test_infeasible_als_bounds_name_the_target(tmp_path):
    cfg = PruneConfig(allocation="als", sparsity=0.5, als=ALSOptions(bounds="absolute", s_min=0.6, s_max=0.8, tokens=16))
    with pytest.raises(ValueError, match="0.5"):
        prune_(make_tiny("llama"), torch.randint(1, 96, (2, 8)), cfg)


def test_als_pass1_uses_only_the_first_windows(tmp_path):
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    # a strength search holds the last quarter out of pass 1 as well: 6 of the 8 windows
    for windows, strength, expected in ((2, None, 2), (None, None, 6), (None, 0.1, 8)):
        cfg = PruneConfig(allocation="als", batch_size=2,
                          als=ALSOptions(windows=windows, tokens=None, strength=strength))
        report = prune_(make_tiny("llama"), ids, cfg)
        diag = report.allocation["diagnostics"]
        assert diag["rm_windows"] == expected and diag["rm_tokens"] == expected * 16


@pytest.mark.parametrize("name", ["als", "owl"])
def test_pass1_cache_reuses_the_dense_pass_with_identical_results(name, tmp_path):
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    cache: dict = {}
    for method, sparsity in [("wanda", 0.5), ("magnitude", 0.6), ("wanda", 0.6)]:
        fresh = prune_(make_tiny("llama"), ids, _config(name, "block", tmp_path, method=method, sparsity=sparsity))
        reused = prune_(make_tiny("llama"), ids, _config(name, "block", tmp_path, method=method, sparsity=sparsity),
                        pass1_cache=cache)
        assert [r.mask_sha256 for r in reused.linears] == [r.mask_sha256 for r in fresh.linears]
        assert reused.allocation["sparsity"] == fresh.allocation["sparsity"]
    assert len(cache) == 1, "one dense pass serves every sparsity and pruner"
    import dataclasses

    base = _config(name, "block", tmp_path)
    other = dataclasses.replace(base, als=dataclasses.replace(base.als, tokens=32),
                                baselines=dataclasses.replace(base.baselines, owl_m=7.0))
    prune_(make_tiny("llama"), ids, other, pass1_cache=cache)
    assert len(cache) == 2, "a changed option that pass 1 depends on is a miss"


@pytest.mark.parametrize("name", ALLOCATORS.names())
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_masks_are_deterministic_for_every_pruner_and_allocator(method, name, tmp_path):
    """Two independent runs (fresh model, same seed and inputs): bit-identical masks and weights,
    so the reports' mask hashes can be compared across runs."""
    ids = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        model = make_tiny("llama")
        report = prune_(model, ids, _config(name, "block", tmp_path, method=method, sparsity=0.6))
        runs.append((report, model.state_dict()))
    (first, w1), (second, w2) = runs
    assert [r.mask_sha256 for r in first.linears] == [r.mask_sha256 for r in second.linears]
    assert len({r.mask_sha256 for r in first.linears}) == len(first.linears), "hashes tell different masks apart"
    assert first.allocation["sparsity"] == second.allocation["sparsity"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
