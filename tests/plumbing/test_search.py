"""The searched allocation on tiny models: a planted fragile block it must protect, a held-out loss
below uniform's and every warm start's, the exact budget, determinism, resume after a kill, and
the calibration split it is confined to."""

from __future__ import annotations

import pytest
import torch

from alsparse import search, strength
from alsparse.api import prune_
from alsparse.checkpoint import BlockCheckpoints
from alsparse.config import PruneConfig, SearchOptions
from alsparse.models import decoder_blocks, find_linears

from conftest import confident_llama, sample_from, tiny_config

FRAGILE = 1


def _planted(block: int = FRAGILE, windows: int = 32):
    """A tiny llama (3 blocks) where only ``block`` is fragile: its weights all have one magnitude,
    so any pruning removes signal, while 3/4 of every other block's weights are ~0 (pruning up to
    75% of them costs nothing). Windows are sampled from the model itself (confident predictions)."""
    model = confident_llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, b in enumerate(decoder_blocks(model)):
            for ref in find_linears(b):
                w = ref.module.weight
                if i == block:
                    w.copy_(w.sign() * w.abs().mean())
                else:
                    tiny = torch.rand(w.shape, generator=g) < 0.75
                    w.masked_fill_(tiny, 0).add_(tiny * 1e-4)
    return model, sample_from(model, windows, g)


def _config(method="wanda", budget=300, **search):
    options = dict(budget=budget, stages=((3, 2, None), (1, 8, None)), offspring=8)
    options.update(search)
    return PruneConfig(method=method, sparsity=0.6, allocation="search", compute_dtype="float32",
                       search=SearchOptions(**options))


def _record(report):
    return report.to_dict()["allocation"]["diagnostics"]["search"]


@pytest.mark.parametrize("method,database,inputs", [("wanda", "auto", "dense"), ("sparsegpt", "dense", "dense"),
                                                    ("magnitude", "auto", "dense"), ("sparsegpt", "auto", "sequential")])
def test_the_search_protects_the_fragile_block_and_beats_every_warm_start(method, database, inputs):
    """(``auto``, the default database: the dense model's inputs for the mask pruners, the uniformly
    pruned model's for SparseGPT.)"""
    model, ids = _planted()
    report = prune_(model, ids, _config(method, budget=600, database=database))
    record = _record(report)
    assert record["database"] == inputs
    warm = {w["name"]: w["fitness"] for w in record["warm_starts"]}
    assert {"uniform", "owl"} <= set(warm) and any(n.startswith("als(") for n in warm)
    assert any(n.startswith("atp(") for n in warm)
    assert record["final_fitness"] < min(warm.values()), "no better than its best warm start"
    assert record["final_fitness"] < warm["uniform"]
    offsets = record["offsets"]
    assert offsets[FRAGILE] < 0 and offsets[FRAGILE] == min(offsets), "the fragile block is not protected"
    assert sum(offsets) == 0
    assert abs(report.achieved_sparsity - 0.6) < 1e-4
    trace = [t["parent"] for t in record["trace"]]
    assert trace == sorted(trace, reverse=True) and record["generations"] == len(trace) > 0


def test_same_seed_same_masks_and_the_trace_is_reported(tmp_path):
    a = prune_(_planted()[0], _planted()[1], _config())
    b = prune_(_planted()[0], _planted()[1], _config())
    assert [r.mask_sha256 for r in a.linears] == [r.mask_sha256 for r in b.linears]
    assert _record(a)["trace"] == _record(b)["trace"] and _record(a)["offsets"] == _record(b)["offsets"]
    other = prune_(_planted()[0], _planted()[1], _config(budget=0))
    assert _record(other)["generations"] == 0 and _record(other)["start"] == _record(a)["start"]


def test_the_evolved_allocation_is_confirmed_on_every_held_out_window(monkeypatch):
    model, ids = _planted()
    record = _record(prune_(model, ids, _config(stages=((3, 1, None), (1, 2, None)))))
    confirm = record["confirm"]
    assert confirm["windows"] == 8 and confirm["kept"] == "final" and confirm["final"] < confirm["start"]

    # planted: after the evolution, the evolved allocation scores worse than its start everywhere
    real_evolve, real_score, done = search._evolve, search.Scorer.score, {"evolved": None}

    def evolve(*args, **kwargs):
        state = real_evolve(*args, **kwargs)
        done["evolved"] = list(state.parent)
        return state

    def score(self, candidates, windows, length):
        out = real_score(self, candidates, windows, length)
        if done["evolved"] is not None:
            return [5.0 if c == done["evolved"] else 1.0 for c in candidates]
        return out

    monkeypatch.setattr(search, "_evolve", evolve)
    monkeypatch.setattr(search.Scorer, "score", score)
    model, ids = _planted()
    report = prune_(model, ids, _config(stages=((3, 1, None), (1, 2, None))))
    record = _record(report)
    start = next(w for w in record["warm_starts"] if w["name"] == record["start"])
    assert record["confirm"]["kept"] == "start" and record["confirm"]["final"] == 5.0
    assert record["offsets"] != done["evolved"]
    assert [round(s, 9) for s in report.to_dict()["allocation"]["sparsity"]] == [round(s, 9) for s in start["sparsity"]]


class _Killed(Exception):
    pass


def test_a_search_killed_mid_way_resumes_to_the_uninterrupted_allocation(tmp_path, monkeypatch):
    model, ids = _planted()
    whole = _record(prune_(model, ids, _config()))
    saves = {"n": 0}
    real_save = search._save_state

    def killing_save(directory, state):
        real_save(directory, state)
        saves["n"] += 1
        if saves["n"] == 3:
            raise _Killed

    monkeypatch.setattr(search, "_save_state", killing_save)
    model, ids = _planted()
    with pytest.raises(_Killed):
        prune_(model, ids, _config(), checkpoint=BlockCheckpoints(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / search.STATE_FILE).is_file()
    monkeypatch.setattr(search, "_save_state", real_save)
    model, ids = _planted()
    resumed = _record(prune_(model, ids, _config(), checkpoint=BlockCheckpoints(tmp_path / "ckpt"), resume=True))
    assert resumed["offsets"] == whole["offsets"] and resumed["trace"] == whole["trace"]


def test_the_fitness_reads_only_the_held_out_calibration_windows(monkeypatch):
    model, ids = _planted()
    _, heldout = strength.split(ids)
    seen = []
    real = search.Scorer._fitness

    def spy(self, windows, length, **kwargs):
        assert torch.equal(self.heldout, heldout), "scored on something other than the held-out calibration"
        seen.append(tuple(windows))
        return real(self, windows, length, **kwargs)

    monkeypatch.setattr(search.Scorer, "_fitness", spy)
    prune_(model, ids, _config(budget=60))
    assert seen and all(max(w) < heldout.shape[0] for w in seen)


def test_the_warm_starts_statistics_read_only_the_fit_windows(monkeypatch):
    """Pass 1 (ALS's redundancy rows, OWL's Wanda statistics) sees none of the held-out windows the
    warm starts are then scored on; the RM rows come from the first ``als.windows`` windows."""
    import alsparse.pass1 as pass1

    model, ids = _planted()
    fit, _ = strength.split(ids)
    seen = {}
    real_init, real_select = pass1.Collector.__init__, pass1.select_tokens

    def init(self, acts, device, config, needs):
        seen["windows"], seen["needs"] = acts.total_windows, needs
        real_init(self, acts, device, config, needs)

    def select(total_tokens, m, seed):
        seen["rm_tokens"] = total_tokens
        return real_select(total_tokens, m, seed)

    monkeypatch.setattr(pass1.Collector, "__init__", init)
    monkeypatch.setattr(pass1, "select_tokens", select)
    config = _config(budget=0)
    prune_(model, ids, config)
    assert seen["needs"] == {"features", "wanda"} and seen["windows"] == fit.shape[0] < ids.shape[0]
    assert seen["rm_tokens"] == config.als.windows * ids.shape[1]


def test_kl_fitness_runs_and_scores_the_dense_model_zero(tmp_path):
    model, ids = _planted()
    config = _config(fitness="kl")
    fit, heldout = strength.split(ids)
    from alsparse.allocation.evolution import LevelGrid

    grid = LevelGrid(0.6, 0.05, 0.2)
    db = search.build_database(model, fit, config, grid, torch.device("cpu"), tmp_path / "db")
    scorer = search.Scorer(model, heldout, db, config, torch.device("cpu"), tmp_path)
    assert scorer._fitness([0, 1], ids.shape[1]) == pytest.approx(0.0, abs=1e-2)  # bf16 log-probs of itself
    assert scorer.score([[0, 0, 0]], [0, 1], ids.shape[1])[0] > 0.01
    scorer.restore()
    report = prune_(model, ids, _config(fitness="kl", budget=60))
    assert _record(report)["fitness"] == "kl"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_mixed_nm_search_protects_the_fragile_block_with_the_mean_exact(method):
    model, ids = _planted()
    config = PruneConfig(method=method, pattern="4:8", allocation="search", compute_dtype="float32",
                         search=SearchOptions(budget=300, stages=((3, 2, None), (1, 8, None)), offspring=8, span=0.25))
    report = prune_(model, ids, config)
    record, allocation = _record(report), report.to_dict()["allocation"]
    assert record["grid"]["levels"] == pytest.approx([0.25, 0.375, 0.5, 0.625, 0.75])  # 2:8 .. 6:8
    ns = allocation["nm"]["n"]
    assert allocation["nm"]["m"] == 8 and sum(ns) == 4 * len(ns), ns  # the size-weighted mean is 4:8 exactly
    assert ns == [4 + j for j in record["offsets"]]
    warm = {w["name"]: w["fitness"] for w in record["warm_starts"]}
    assert record["final_fitness"] <= min(warm.values()) and record["final_fitness"] < warm["uniform"]
    if method == "wanda":  # SparseGPT's updates make N:M on this model nearly level-blind (held-out 4.365-4.40)
        assert ns[FRAGILE] == min(ns) < 4, "the fragile block is not protected"
    assert abs(report.achieved_sparsity - 0.5) < 1e-4
    for linear in report.linears:  # every linear holds its block's own N:M pattern
        block = int(linear.name.split(".")[2]) if linear.name.startswith("model.layers.") else None
        if block is not None:
            assert linear.pattern == f"{ns[block]}:8"


def test_unsupported_settings_are_refused_before_any_work():
    model, ids = _planted()
    with pytest.raises(ValueError, match="uniform"):
        SearchOptions(warm_start=("als",))
    with pytest.raises(ValueError, match="step"):
        SearchOptions(step=0.5, span=0.2)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prefix_reuse_scores_bit_identically_to_whole_forwards_and_runs_fewer_blocks(tmp_path, method):
    """The scorer with an anchor runs each child from its first block that differs from the anchor;
    the fitness must equal a whole forward's to the last bit, on every window and length, also when
    the anchor moves to the previous call's best (an accepted child)."""
    import random

    from transformers import AutoModelForCausalLM

    from alsparse.allocation.evolution import LevelGrid, mutate, size_groups

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 8
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = sample_from(model, 16, torch.Generator().manual_seed(1))
    config = _config(method=method)
    fit, heldout = strength.split(ids)
    grid = LevelGrid(0.6, 0.05, 0.2)
    db = search.build_database(model, fit, config, grid, torch.device("cpu"), tmp_path / "db")
    plain = search.Scorer(model, heldout, db, config, torch.device("cpu"), tmp_path)
    groups, rng = size_groups([1] * 8), random.Random(0)
    parent, calls, whole = [0] * 8, [], []
    for generation in range(8):
        children = [mutate(parent, rng, groups, grid, 1) for _ in range(5)]
        for windows, length in (([generation % 4], 8), ([0, 1], ids.shape[1])):
            calls.append((parent, children, windows, length))
            whole.append(plain.score(children, windows, length))
        parent = children[min(range(5), key=lambda i: whole[-1][i])]  # accepted: the best child
    plain.restore()
    reusing = search.Scorer(model, heldout, db, config, torch.device("cpu"), tmp_path)
    reused = []
    for anchor, children, windows, length in calls:
        reusing.anchor = list(anchor)
        reused.append(reusing.score(children, windows, length))
    reusing.restore()
    assert reused == whole  # exact equality, not approx
    assert reusing.blocks_asked == plain.blocks_asked == plain.blocks_run
    assert reusing.blocks_run < 0.9 * plain.blocks_run
    reusing.forget_prefixes()
    assert reusing.anchor is None and not reusing._kept


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_assembled_final_model_is_the_model_the_search_scored(monkeypatch, method):
    import alsparse.api as api

    def no_sequential_pass(*args, **kwargs):
        raise AssertionError("an assembled final model needs no sequential pruning pass")

    model, ids = _planted()
    monkeypatch.setattr(api, "_prune_blocks", no_sequential_pass)
    report = prune_(model, ids, _config(method, final="assembled"))
    record = _record(report)
    assert record["final"] == "assembled" and record["confirm"]["kept"] == "final"
    # the held-out NLL of the model it returns is the search's own figure for the chosen allocation
    assert record["final_heldout_nll"] == pytest.approx(record["confirm"]["final"], rel=1e-3)
    assert record["assembled_heldout_fitness"] == record["confirm"]["final"]
    assert abs(report.achieved_sparsity - 0.6) < 1e-4
    levels = [round(0.6 + 0.05 * j, 6) for j in record["offsets"]]
    for block in range(len(levels)):
        linears = [r for r in report.linears if r.block == block]
        achieved = sum(r.achieved * r.numel for r in linears) / sum(r.numel for r in linears)
        assert achieved == pytest.approx(levels[block], abs=2e-3)


def test_an_assembly_killed_mid_way_resumes_to_the_uninterrupted_masks(tmp_path, monkeypatch):
    whole = prune_(*_planted(), _config(final="assembled"))
    real_assemble, calls = search.assemble_block, {"n": 0}

    def killing_assemble(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Killed
        return real_assemble(*args, **kwargs)

    monkeypatch.setattr(search, "assemble_block", killing_assemble)
    with pytest.raises(_Killed):
        prune_(*_planted(), _config(final="assembled"), checkpoint=BlockCheckpoints(tmp_path / "ckpt"))
    monkeypatch.setattr(search, "assemble_block", real_assemble)
    resumed = prune_(*_planted(), _config(final="assembled"), checkpoint=BlockCheckpoints(tmp_path / "ckpt"),
                     resume=True)
    assert resumed.resumed_from_block == 1
    assert [r.mask_sha256 for r in resumed.linears] == [r.mask_sha256 for r in whole.linears]
    assert _record(resumed)["final_heldout_nll"] == pytest.approx(_record(whole)["final_heldout_nll"], rel=1e-6)


def test_a_sequential_final_model_reports_its_held_out_loss_and_bad_finals_are_refused():
    record = _record(prune_(*_planted(), _config(budget=60, final="sequential")))
    assert record["final"] == "sequential" and 0 < record["final_heldout_nll"] < 20
    assert 0 < record["assembled_heldout_fitness"] < 20
    with pytest.raises(ValueError, match="search final 'stitched' is not valid; choose one of: auto, sequential, assembled"):
        SearchOptions(final="stitched")


@pytest.mark.parametrize("method,way", [("wanda", "assembled"), ("magnitude", "assembled"), ("sparsegpt", "sequential")])
def test_the_default_final_model_is_assembled_for_mask_pruners_and_sequential_for_sparsegpt(monkeypatch, method, way):
    import alsparse.api as api

    assert SearchOptions().final == "auto"
    passes = {"sequential": 0, "assembled": 0}
    for name, key in (("_prune_blocks", "sequential"), ("_assemble_blocks", "assembled")):
        real = getattr(api, name)

        def counted(*args, _real=real, _key=key, **kwargs):
            passes[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(api, name, counted)
    report = prune_(*_planted(), _config(method, budget=60))
    assert _record(report)["final"] == way and passes == {way: 1, ({"sequential", "assembled"} - {way}).pop(): 0}
    assert abs(report.achieved_sparsity - 0.6) < 1e-4


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "unstructured"), ("wanda", "2:4")])
def test_the_level_database_holds_what_one_prune_per_level_gives(tmp_path, monkeypatch, method, pattern):
    import alsparse.pruning as pruning

    model, ids = _planted()
    fit, _ = strength.split(ids)
    config = PruneConfig(method=method, sparsity=0.5 if pattern != "unstructured" else 0.6, pattern=pattern,
                         allocation="search", compute_dtype="float32")
    grid = search.level_grid(config)
    device = torch.device("cpu")
    shared = search.build_database(model, fit, config, grid, device, tmp_path / "shared")
    monkeypatch.setattr(pruning._ScoreMasked, "prune_levels", pruning.Pruner.prune_levels)
    apart = search.build_database(model, fit, config, grid, device, tmp_path / "apart")
    dense = [{ref.name: ref.weight_oi.detach() for ref in find_linears(b)} for b in decoder_blocks(model)]
    for block in range(len(dense)):
        for offset in grid.offsets():
            a, b = shared.weights(block, offset, dense[block]), apart.weights(block, offset, dense[block])
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefix_reuse_releases_the_oldest_windows_instead_of_stopping(tmp_path, monkeypatch):
    """A parent that stays while the sampled windows change must not fill the prefix store for good:
    the oldest kept windows are released, reuse goes on, the store stays within its bound and the
    fitness equals whole forwards exactly."""
    import random

    from transformers import AutoModelForCausalLM

    from alsparse.allocation.evolution import LevelGrid, mutate, size_groups

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 6
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = sample_from(model, 16, torch.Generator().manual_seed(1))
    config = _config()
    fit, heldout = strength.split(ids)
    grid = LevelGrid(0.6, 0.05, 0.2)
    db = search.build_database(model, fit, config, grid, torch.device("cpu"), tmp_path / "db")
    length = 8
    per_window = 6 * length * cfg.hidden_size * 4  # one window's block outputs, fp32
    monkeypatch.setattr(search, "PREFIX_BYTES", 5 * per_window)  # the anchor's on 2 windows + one call's need
    groups, rng = size_groups([1] * 6), random.Random(0)
    parent = [0] * 6
    calls = [([mutate(parent, rng, groups, grid, 1) for _ in range(4)], [w % heldout.shape[0]]) for w in range(8)]
    plain = search.Scorer(model, heldout, db, config, torch.device("cpu"), tmp_path)
    whole = [plain.score(children, windows, length) for children, windows in calls]
    plain.restore()
    reusing = search.Scorer(model, heldout, db, config, torch.device("cpu"), tmp_path)
    reused = []
    for children, windows in calls:
        reusing.anchor = list(parent)
        reused.append(reusing.score(children, windows, length))
        assert (windows[0], length) in reusing._kept, "reuse stopped once the store was full"
        assert sum(h.nbytes for _, o in reusing._kept.values() for h, _ in o) <= search.PREFIX_BYTES
    reusing.restore()
    assert reused == whole


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_pass1_on_the_databases_stream_equals_a_pass1_of_its_own(tmp_path, method):
    """The search collects pass 1 on its level database's dense stream (magnitude, which streams
    nothing, and a database reused from disk run it apart): the same statistics, the same search."""
    from alsparse.allocate import allocation_needs
    from alsparse.api import _capture, _pass1_on_fit_windows
    from alsparse.pass1 import collect

    model, ids = _planted()
    config = _config(method, budget=36, database="dense")  # a sequential database streams no dense pass
    fit, _ = strength.split(ids)
    pass1_config, needs = _pass1_on_fit_windows(config, ids), allocation_needs(config)
    apart = collect(model, _capture(model, fit, torch.device("cpu"), config), torch.device("cpu"), pass1_config, needs)
    found_a, record_a, data_a = search.run(model, ids, config, apart, torch.device("cpu"))
    found_b, record_b, data_b = search.run(model, ids, config, None, torch.device("cpu"), state_dir=tmp_path,
                                           pass1=(pass1_config, needs))
    assert ("pass1_s" in record_b["search"]["seconds"]) == (method == "magnitude")
    _, _, data_c = search.run(model, ids, config, None, torch.device("cpu"), state_dir=tmp_path,
                              pass1=(pass1_config, needs))  # the database is reused: pass 1 runs apart
    for data in (data_b, data_c):
        assert data.keys() == apart.keys()
        for key, value in apart.items():
            assert torch.equal(data[key], value) if isinstance(value, torch.Tensor) else data[key] == value
    assert found_a == found_b and record_a["search"]["trace"] == record_b["search"]["trace"]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_a_sequential_database_holds_the_uniform_sequential_prune_and_leaves_the_model_dense(tmp_path, method):
    """database="sequential": each block's level 0 is what a uniform sequential prune at the target
    gives (its inputs come from the pruned blocks before it), the other levels are pruned from those
    same inputs, and the model is dense again afterwards. (At 50% every linear's count is exact, so
    the uniform prune tops up no weight the database's floored count leaves.)"""
    import copy
    import dataclasses

    model, ids = _planted()
    fit, _ = strength.split(ids)
    config = dataclasses.replace(_config(method, database="sequential"), sparsity=0.5)
    grid = search.level_grid(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    db = search.build_database(model, fit, config, grid, torch.device("cpu"), tmp_path / "db")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model was left pruned"
    uniform = copy.deepcopy(model)
    prune_(uniform, fit, PruneConfig(method=method, sparsity=0.5, compute_dtype="float32"))
    dense_config = dataclasses.replace(_config(method, database="dense"), sparsity=0.5)
    dense_db = search.build_database(model, fit, dense_config, grid, torch.device("cpu"), tmp_path / "dense")
    differs = False
    for b, (block, pruned) in enumerate(zip(decoder_blocks(model), decoder_blocks(uniform))):
        dense = {ref.name: ref.weight_oi.detach() for ref in find_linears(block)}
        level0 = db.weights(b, 0, dense)
        for ref in find_linears(pruned):
            assert torch.equal(level0[ref.name], ref.weight_oi.detach()), f"block {b} {ref.name}"
        for offset in grid.offsets():
            seq, den = db.weights(b, offset, dense), dense_db.weights(b, offset, dense)
            if b == 0:  # the first block's inputs are the dense model's either way
                assert all(torch.equal(seq[k], den[k]) for k in seq)
            else:
                differs |= any(not torch.equal(seq[k], den[k]) for k in seq)
    assert differs, "the later blocks' levels did not see the pruned inputs"

