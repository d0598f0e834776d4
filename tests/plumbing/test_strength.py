"""The strength search (ATP's beta, graded ALS's strength) on held-out calibration windows: planted
cases where uniform must win and where a non-zero strength must win, both scoring modes, the head
that scores the streamed candidates, and the calibration split it is confined to."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alsparse import strength
from alsparse.api import prune_
from alsparse.capture import capture_block_inputs, stream_blocks
from alsparse.config import ALSOptions, BaselineOptions, PruneConfig
from alsparse.models import decoder_blocks, find_linears, head_logits

from conftest import FAMILIES, make_fragile, make_tiny

IDS = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_of_streamed_hidden_states_equal_the_model_logits(family):
    model = make_tiny(family)
    acts = capture_block_inputs(model, IDS[:2], torch.device("cpu"), batch_size=2)
    for step in stream_blocks(model, acts, torch.device("cpu")):
        last = step.outputs = step.run()
    with torch.no_grad():
        expected = model(input_ids=IDS[:2], use_cache=False).logits.float()
    torch.testing.assert_close(head_logits(model, last[0]), expected, rtol=1e-5, atol=1e-5)


def _fragile(block: int):
    return make_fragile(block)


def _psi_protecting(block: int, L: int = 3) -> torch.Tensor:
    """A redundancy matrix under which ALS finds ``block`` the least redundant (most important)
    and, through the suffix mean, gives it the lowest sparsity."""
    psi = torch.full((L, L), 0.9, dtype=torch.float64).fill_diagonal_(1.0)
    psi[block, :] = psi[:, block] = 0.05
    psi[block, block] = 1.0
    return psi


def _als_config(**kw):
    return PruneConfig(method="wanda", sparsity=0.6, allocation="als",
                       als=ALSOptions(tokens=48, strength_grid=(0.0, 0.2, 0.4)), **kw)


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_the_search_picks_a_strength_when_it_protects_the_fragile_block(mode):
    model, ids = _fragile(0)
    config = _als_config(strength_search=mode)
    chosen, record = strength.select(model, ids, config, {"block_psi": _psi_protecting(0)}, torch.device("cpu"))
    search = record[strength.RECORD]
    assert search["candidates"] == [0.0, 0.2, 0.4] and len(search["heldout_loss"]) == 3
    assert chosen.als.strength > 0 and search["chosen"] == chosen.als.strength
    assert min(search["heldout_loss"][1:]) < search["heldout_loss"][0]


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_the_search_picks_uniform_when_every_strength_is_worse(mode):
    model, ids = _fragile(0)  # ALS told block 2 matters: it prunes the fragile block 0 harder
    config = _als_config(strength_search=mode)
    chosen, record = strength.select(model, ids, config, {"block_psi": _psi_protecting(2)}, torch.device("cpu"))
    losses = record[strength.RECORD]["heldout_loss"]
    assert chosen.als.strength == 0.0 and losses[0] < min(losses[1:])


def test_atp_uses_the_same_search_and_its_choice_reaches_the_report():
    model, ids = _fragile(0)  # ATP's ramp protects the early blocks: a beta > 0 wins
    report = prune_(model, ids, PruneConfig(method="wanda", sparsity=0.6, allocation="atp",
                                            baselines=BaselineOptions(atp_grid=3)))
    search = report.allocation["diagnostics"][strength.RECORD]
    assert search["parameter"] == "atp_beta" and search["chosen"] > 0
    assert report.config["baselines"]["atp_beta"] == search["chosen"]
    assert report.allocation["diagnostics"]["beta"] == search["chosen"]
    assert "strength_search" in report.timings_s


def test_oneshot_scores_equal_allocations_once_and_match_a_direct_evaluation():
    """A uniform candidate scored in the stream equals the loss of the model pruned block by block
    from the dense inputs and evaluated with an ordinary forward."""
    from alsparse.allocate import allocate
    from alsparse.capture import record_input_stats
    from alsparse.pruning import PRUNERS

    model = make_tiny("llama")
    config = PruneConfig(method="wanda", sparsity=0.5)
    fit, heldout = strength.split(IDS)
    uniform = allocate(model, config, {})
    losses = strength.oneshot_losses(model, fit, heldout, [uniform, uniform], config, torch.device("cpu"))
    assert losses[0] == losses[1]
    direct = make_tiny("llama")
    acts = capture_block_inputs(direct, fit, torch.device("cpu"))
    for step in stream_blocks(direct, acts, torch.device("cpu")):
        stats = record_input_stats(step, True, False, keep_outputs=True)
        pruned = [PRUNERS.get("wanda").prune(r.weight_oi, stats[r.name], 0.5, config.parsed_pattern) for r in step.linears]
        outputs = step.outputs
        for ref, weight in zip(step.linears, pruned):
            ref.write_(weight)
        step.outputs = outputs  # the next block sees the dense outputs, as in the search
    assert losses[0] == pytest.approx(strength.heldout_loss(direct, heldout), rel=1e-5)
    torch.testing.assert_close(  # the search leaves the dense model as it was
        dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"],
        dict(make_tiny("llama").named_parameters())["model.layers.0.mlp.up_proj.weight"])


def test_the_search_sees_only_calibration_windows(monkeypatch):
    """The held-out windows are the last quarter of the calibration sample: no other text reaches
    the scorer (evaluation corpora are never loaded by it)."""
    seen = []
    real = strength.oneshot_losses

    def spy(model, fit, heldout, allocations, config, device):
        seen.append((fit, heldout))
        return real(model, fit, heldout, allocations, config, device)

    monkeypatch.setattr(strength, "oneshot_losses", spy)
    import alsparse.data.text as text

    monkeypatch.setattr(text, "load_corpus", lambda *a, **k: pytest.fail("the search loaded a corpus"))
    report = prune_(make_tiny("llama"), IDS, _als_config())
    (fit, heldout), = seen
    assert torch.equal(fit, IDS[:6]) and torch.equal(heldout, IDS[6:])
    search = report.allocation["diagnostics"][strength.RECORD]
    assert (search["fit_windows"], search["heldout_windows"]) == (6, 2)


def test_a_given_strength_skips_the_search_and_one_window_is_refused():
    config = dataclasses.replace(_als_config(), als=ALSOptions(tokens=48, strength=0.1))
    report = prune_(make_tiny("llama"), IDS, config)
    assert strength.RECORD not in report.allocation["diagnostics"]
    assert report.allocation["diagnostics"]["strength"] == 0.1
    with pytest.raises(ValueError, match="at least 2 calibration windows"):
        prune_(make_tiny("llama"), IDS[:1], _als_config())


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_sorts_kept_across_candidates_change_no_loss(monkeypatch, method):
    """The one-shot search keeps each linear's score order across its candidates (the same dense
    weights every time): the held-out losses are those of sorting afresh for each candidate."""
    model, ids = _fragile(0)
    config = dataclasses.replace(_als_config(), method=method)
    data = {"block_psi": _psi_protecting(0)}
    kept = strength.select(model, ids, config, data, torch.device("cpu"))[1][strength.RECORD]["heldout_loss"]
    monkeypatch.setattr(strength, "ORDERS_BYTES", 0)
    afresh = strength.select(model, ids, config, data, torch.device("cpu"))[1][strength.RECORD]["heldout_loss"]
    assert kept == afresh and len(set(kept)) > 1
