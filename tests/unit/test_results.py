"""Results files and report tables on hand-made records: partial last lines, seeds (mean and spread),
bold best, delta to uniform, protocols and calibrations kept apart, the pass-1 LRU cache."""

from __future__ import annotations

import json
import logging

import pytest

from alsparse.results import ResultsFileError, build_report, load_results, read_records, write_report
from alsparse.sweep import LRUCache


def record(method="wanda", allocation="uniform", sparsity=0.5, seed=0, ppl=40.0, seq_len=1024, windows=40,
           nsamples=32, kind="pruned", name=None, varied=None, label=None, pattern="unstructured", tasks=None,
           word_ppl=None, model="m"):
    config = {"model": model, "dtype": "float32"}
    if kind == "pruned":
        config.update(method=method, allocation=allocation, sparsity=sparsity, pattern=pattern, seed=seed,
                      calibration={"corpus": "wikitext2", "nsamples": nsamples, "seqlen": 1024}, als={},
                      baselines={})
    ev = {"token_ppl": {"wikitext2": {"corpus": "wikitext2", "split": "test", "seq_len": seq_len,
                                      "windows": windows, "bos": False, "ppl": ppl}},
          "word_ppl": {}, "tasks": {}, "tasks_mean": None}
    if word_ppl is not None:
        ev["word_ppl"] = {"wikitext2": {"corpus": "wikitext2", "split": "test", "max_length": 2048,
                                        "documents": 62, "word_perplexity": word_ppl}}
    if tasks:
        ev["tasks"] = {t: {"task": t, "n": 100, "metric_of_record": "acc", "value": v} for t, v in tasks.items()}
        ev["tasks_mean"] = {"value": sum(tasks.values()) / len(tasks)}
    ident = json.dumps([kind, method, allocation, sparsity, seed, seq_len, windows, nsamples, name, varied, pattern,
                        model, bool(tasks), word_ppl])
    return {"id": ident, "kind": kind, "name": name, "varied": varied or {},
            "label": label or (allocation if kind == "pruned" else "dense"), "config": config,
            "calibration": {"source": "wikitext2 validation"}, "eval": ev,
            "timings_s": {"capture": 1.0, "pass1": 2.0, "prune": 10.0, "eval": 5.0}, "wall_s": 20.0,
            "machine": {"busy": False}, "peak_rss_cell_gib": 1.25, "pass1_reused": False}


def _rows(markdown: str, prefix: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith(prefix)]


def test_read_records_ignores_a_partial_last_line_and_rejects_a_corrupt_middle(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    good = json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}) + "\n"
    path.write_text(good + '{"id": "c", "ev')
    with caplog.at_level(logging.WARNING):
        records, valid = read_records(path, with_offset=True)
    assert [r["id"] for r in records] == ["a", "b"] and valid == len(good.encode())
    assert "line 3 is incomplete" in caplog.text
    path.write_text(good + json.dumps({"id": "c"}))  # complete JSON but no newline: also an interrupted write
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    path.write_text(good + "\n\n")
    assert read_records(path, with_offset=True) == (records, len(good) + 2)
    path.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(ResultsFileError, match="line 2 is not a valid result record"):
        read_records(path)
    path.write_text('{"id": "a"}\n[1, 2]\n{"id": "b"}\n')
    with pytest.raises(ResultsFileError, match="line 2"):
        read_records(path)


def test_load_results_keeps_each_cell_once(tmp_path):
    one, two = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    one.write_text(json.dumps({"id": "a", "v": 1}) + "\n")
    two.write_text(json.dumps({"id": "a", "v": 2}) + "\n" + json.dumps({"id": "b"}) + "\n")
    assert [(r["id"], r.get("v")) for r in load_results([one, two])] == [("a", 1), ("b", None)]
    with pytest.raises(FileNotFoundError):
        load_results([tmp_path / "missing.jsonl"])


def test_ppl_table_seeds_bold_and_delta():
    records = [
        record(kind="dense", ppl=19.0),
        record(allocation="uniform", seed=0, ppl=40.0), record(allocation="uniform", seed=1, ppl=42.0),
        record(allocation="als", seed=0, ppl=38.0), record(allocation="als", seed=1, ppl=39.0),
        record(allocation="owl", seed=0, ppl=41.5),
        record(allocation="uniform", sparsity=0.7, ppl=600.0), record(allocation="als", sparsity=0.7, ppl=650.0),
        record(allocation="owl", sparsity=0.7, ppl=550.0),
        record(allocation="uniform", pattern="2:4", ppl=90.0), record(allocation="als", pattern="2:4", ppl=95.0),
    ]
    markdown = build_report(records, figures=False).markdown
    assert "### token-ppl, wikitext2 test, seq_len 1024, first 40 non-overlapping windows" in markdown
    assert "Dense: 19.00." in markdown and "mean ± half the min-max range" in markdown
    header = _rows(markdown, "| method / sparsity |")[0]
    assert header == "| method / sparsity | uniform | als | owl |"  # uniform first, then as they appear
    assert _rows(markdown, "| wanda 50% |") == [
        "| wanda 50% | 41.00 ± 1.00 | **38.50** ± 0.50 (-2.50) | 41.50 (+1.50) |"]  # owl: seed 0 vs uniform's seed 0
    assert _rows(markdown, "| wanda 70% |") == ["| wanda 70% | 600.00 | 650.00 (+50.00) | **550.00** (-50.00) |"]
    assert _rows(markdown, "| wanda 2:4 |") == ["| wanda 2:4 | **90.00** | 95.00 (+5.00) |  |"]
    table = [line for line in markdown.splitlines() if line.startswith("| wanda")]
    assert [line.split(" | ")[0] for line in table[:3]] == ["| wanda 50%", "| wanda 70%", "| wanda 2:4"]


def test_cells_with_fewer_seeds_are_compared_on_the_seeds_they_share():
    # ATP's search picked beta = 0 (uniform) for seed 0 only; uniform has a second, worse seed. Against
    # uniform's two-seed mean ATP would look 2.50 better and be the row's lone best: a seed swing, not a gain.
    records = [record(allocation="uniform", seed=0, ppl=95.0), record(allocation="uniform", seed=1, ppl=100.0),
               record(allocation="atp", seed=0, ppl=95.0),
               record(allocation="owl", seed=0, ppl=102.0), record(allocation="owl", seed=1, ppl=104.0),
               record(allocation="dlp", seed=1, ppl=99.0)]
    markdown = build_report(records, figures=False).markdown
    # no seed is common to the whole row (dlp has only seed 1): the row falls back to each cell's mean
    assert _rows(markdown, "| wanda 50% |") == [
        "| wanda 50% | 97.50 ± 2.50 | **95.00** (+0.00) | 103.00 ± 1.00 (+5.50) | 99.00 (-1.00) |"]
    without_dlp = build_report(records[:-1], figures=False).markdown
    assert _rows(without_dlp, "| wanda 50% |") == [  # judged on seed 0: uniform and atp tie at 95.00
        "| wanda 50% | **97.50** ± 2.50 | **95.00** (+0.00) | 103.00 ± 1.00 (+5.50) |"]
    assert "compared with uniform's seed 0, not with its mean" in markdown


def test_values_that_print_alike_are_bold_alike():
    # two means of the same percentages summed in another order differ in the last bit, and print the same
    records = [record(allocation="uniform", ppl=40.0), record(allocation="als", ppl=30.3),
               record(allocation="owl", ppl=30.3 + 1e-12)]
    assert records[1]["eval"]["token_ppl"]["wikitext2"]["ppl"] != records[2]["eval"]["token_ppl"]["wikitext2"]["ppl"]
    markdown = build_report(records, figures=False).markdown
    assert _rows(markdown, "| wanda 50% |") == ["| wanda 50% | 40.00 | **30.30** (-9.70) | **30.30** (-9.70) |"]


def test_protocols_and_calibrations_are_never_mixed():
    records = [
        record(kind="dense", ppl=19.0), record(kind="dense", ppl=21.0, seq_len=512, windows=80),
        record(allocation="uniform", ppl=40.0), record(allocation="als", ppl=38.0),
        record(allocation="uniform", ppl=44.0, seq_len=512, windows=80),
        record(allocation="als", ppl=43.0, seq_len=512, windows=80),
        record(allocation="uniform", ppl=45.0, windows=10), record(allocation="uniform", ppl=47.0, nsamples=128),
        record(allocation="uniform", sparsity=0.6, ppl=50.0, word_ppl=30.0),
    ]
    markdown = build_report(records, figures=False).markdown
    sections = {s.split("\n", 1)[0]: s for s in markdown.split("\n### ")[1:]}
    full = sections["token-ppl, wikitext2 test, seq_len 1024, first 40 non-overlapping windows"]
    short = sections["token-ppl, wikitext2 test, seq_len 512, first 80 non-overlapping windows"]
    few = sections["token-ppl, wikitext2 test, seq_len 1024, first 10 non-overlapping windows"]
    word = sections["word-ppl (lm-eval rolling), wikitext2 test, max_length 2048, 62 documents"]
    assert "Dense: 19.00" in full and "Dense: 21.00" in short and "not in the results" in few
    assert _rows(short, "| wanda 50% |") == ["| wanda 50% | 44.00 | **43.00** (-1.00) |"]
    assert "44.00" not in full and "40.00" not in short and "50.00" not in word
    assert _rows(word, "| wanda 60% |") == ["| wanda 60% | 30.00 |"]
    # a different calibration size is another table under the same protocol heading
    assert markdown.count("### token-ppl, wikitext2 test, seq_len 1024, first 40 non-overlapping windows") == 2
    assert "calibration wikitext2 validation, 128 x 1024 tokens" in markdown


def test_zero_shot_ablation_and_cost_tables():
    tasks = {"piqa": 0.60, "boolq": 0.50}
    records = [
        record(kind="dense", tasks={"piqa": 0.70, "boolq": 0.62}),
        record(allocation="uniform", tasks=tasks), record(allocation="als", tasks={"piqa": 0.64, "boolq": 0.52}),
        record(allocation="als", name="delta", varied={"als.delta": 0.1}, ppl=37.0, label="als (delta=0.1)",
               sparsity=0.6),
        record(allocation="als", name="delta", varied={"als.delta": 0.3}, ppl=39.0, label="als (delta=0.3)",
               sparsity=0.6),
    ]
    records[3]["config"]["als"] = {"delta": 0.1}
    records[4]["config"]["als"] = {"delta": 0.3}
    markdown = build_report(records, figures=False).markdown
    assert "### Zero-shot: boolq (acc, n=100), piqa (acc, n=100)" in markdown and "Dense mean: 66.00." in markdown
    assert _rows(markdown, "| wanda 50% | 55.00") == ["| wanda 50% | 55.00 | **58.00** (+3.00) |"]
    assert "| dense | - | 62.00 | 70.00 | 66.00 |" in markdown
    assert "| wanda 50% | als | 52.00 | 64.00 | 58.00 |" in markdown
    ablation = markdown.split("### Ablation `delta`")[1].split("##")[0]
    assert "| delta | wanda 60% als |" in ablation
    assert "| delta=0.1 | **37.00** |" in ablation and "| delta=0.3 | 39.00 |" in ablation
    assert "Uniform allocation" not in ablation  # the main grid has no uniform cell at 60%
    records += [record(allocation="uniform", sparsity=0.6, ppl=38.0), record(allocation="uniform", sparsity=0.6,
                                                                              ppl=99.0, nsamples=8),
                record(allocation="uniform", sparsity=0.6, ppl=77.0, seed=1)]
    ablation = build_report(records, figures=False).markdown.split("### Ablation `delta`")[1].split("##")[0]
    assert "Uniform allocation, same pruner, target and calibration: wanda 60% 38.00." in ablation, ablation
    calib = [record(allocation=a, name="calib_size", varied={"calibration.nsamples": n}, nsamples=n, sparsity=0.6,
                    ppl=p + n) for a, p in (("uniform", 70.0), ("als", 110.0)) for n in (8, 16)]
    ablation = build_report(calib, figures=False).markdown.split("### Ablation `calib_size`")[1]
    assert _rows(ablation, "| nsamples=") == ["| nsamples=8 | **78.00** | **118.00** |",
                                              "| nsamples=16 | 86.00 | 126.00 |"]  # each row once, both columns
    assert "Uniform allocation" not in ablation  # the calibration varies: no single reference
    cost = markdown.split("## Cost")[1]
    assert "| wanda | uniform | 40 x 1024 windows + 2 tasks x 100 | 1 | 1.0 | 2.0 | 10.0 | 5.0 | 20.0 | 1.25 |" in cost


def test_cost_leaves_out_a_cell_starved_of_cpu_mid_run():
    records = [record(allocation=a, sparsity=s) for a in ("uniform", "owl") for s in (0.5, 0.6, 0.7)]
    for r in records:
        r["machine"] = {"busy": False, "cpu_per_wall": 1.95}
    records[-1]["machine"]["cpu_per_wall"] = 1.28  # other work between the cell's start and end
    records[-1]["timings_s"]["prune"] = 99.0
    cost = build_report(records, figures=False).markdown.split("## Cost")[1]
    assert "1 of 6 cells ran beside other work" in cost
    assert "| wanda | owl | 40 x 1024 windows | 2 |" in cost and "99.0" not in cost
    assert "| wanda | uniform | 40 x 1024 windows | 3 |" in cost


def test_cost_shows_stage_peaks_and_the_als_overhead_per_pruner():
    als_mag = record(method="magnitude", allocation="als")
    als_mag["timings_s"] = {"pass1": 30.0, "allocation": 0.5, "prune": 10.0, "eval": 5.0}
    als_mag["stage_peak_rss_gib"] = {"pass1": 1.5, "prune": 1.2}
    als_wanda = record(method="wanda", allocation="als", sparsity=0.7)
    als_wanda["timings_s"] = {"pass1": 0.0, "allocation": 1.5, "prune": 155.0, "eval": 5.0}
    als_wanda["pass1_reused"] = True  # its 0 s must not dilute the pass-1 mean
    old = record(method="wanda", allocation="uniform")  # no stage peaks recorded
    ablation = record(method="wanda", allocation="als", name="feature", varied={"als.feature": "output"},
                      label="als (feature=output)", sparsity=0.6)
    ablation["timings_s"]["pass1"] = 500.0  # another feature: not the default ALS pass 1
    cost = build_report([als_mag, als_wanda, old, ablation], figures=False).markdown.split("## Cost")[1]
    assert "| magnitude | als | 40 x 1024 windows | 1.50 | 1.20 |" in cost
    assert "| wanda | uniform | 40 x 1024 windows | - | - |" not in cost, "a row with no stage peaks is left out"
    assert "mean of 1 default-ALS cells" in cost
    assert "| magnitude | 1 | 30.0 | 0.50 | 10.0 | 305% |" in cost  # (30 + 0.5) / 10
    assert "| wanda | 1 | 30.0 | 1.50 | 155.0 | 20% |" in cost  # (30 + 1.5) / 155


def test_cost_gives_each_allocator_as_a_multiple_of_one_uniform_prune_of_the_same_pruner():
    uniform = [record(seed=s) for s in (0, 1)]
    uniform[0]["timings_s"] = {"load": 9.0, "capture": 1.0, "pass1": 0.0, "prune": 79.0, "eval": 50.0}
    uniform[1]["timings_s"] = {"load": 9.0, "capture": 1.0, "pass1": 0.0, "prune": 99.0, "eval": 50.0}  # mean 90
    fresh = record(allocation="search", sparsity=0.6)
    fresh["timings_s"] = {"load": 1.0, "pass1": 40.0, "search": 700.0, "prune": 80.0, "heldout": 10.0, "eval": 99.0}
    reused = record(allocation="search", sparsity=0.7)  # the sweep's cached pass 1: counted at the fresh cell's 40
    reused["timings_s"] = {"pass1": 0.0, "search": 660.0, "prune": 80.0, "heldout": 10.0, "eval": 99.0}
    reused["pass1_reused"] = True
    sgpt = record(method="sparsegpt", allocation="search", sparsity=0.7)  # pass 1 from Wanda's search cell
    sgpt["timings_s"] = {"pass1": 0.0, "search": 900.0, "prune": 150.0}
    sgpt["pass1_reused"] = True
    merged = record(method="sparsegpt", allocation="search", sparsity=0.6)  # pass 1 inside its search stage
    merged["timings_s"] = {"search": 1000.0, "prune": 150.0}
    owl = record(allocation="owl")  # reused a pass 1 no OWL cell ran: no figure rather than a wrong one
    owl["pass1_reused"] = True
    ablation = record(name="calib_size", varied={"calibration.nsamples": 8}, nsamples=8)  # not the baseline
    ablation["timings_s"] = {"prune": 900.0}
    cost = build_report([*uniform, fresh, reused, sgpt, merged, owl, ablation],
                        figures=False).markdown.split("## Cost")[1]
    assert "| wanda | uniform | 2 | 90.0 | 80-100 | 1.0x |" in cost
    assert "| wanda | search | 2 | 810.0 | 790-830 | 9.0x |" in cost  # (830 + 790) / 2 / 90
    assert "| sparsegpt | search | 2 | 1120.0 | 1090-1150 | - |" in cost  # no uniform SparseGPT cell: no multiple
    assert "| wanda | owl | 1 | - | - | - |" in cost and "1 row(s) reused a pass 1" in cost
    assert "| wanda | [calib_size] uniform | 1 | 900.0 | 900 | 10.0x |" in cost
    assert "search s" in cost and "heldout s" in cost, "the search's own stages have columns"


def test_a_one_value_ablation_names_its_value_from_the_label():
    cells = [record(allocation="search", name="final", label="search (final=sequential)", seed=s, ppl=p)
             for s, p in ((0, 150.0), (1, 140.0))]
    ablation = build_report(cells, figures=False).markdown.split("### Ablation `final`")[1]
    assert _rows(ablation, "| final=sequential |") == ["| final=sequential | 145.00 ± 5.00 |"], ablation


def test_write_report_writes_markdown_and_one_figure_per_method(tmp_path):
    records = [record(kind="dense", ppl=19.0)]
    for allocation, values in {"uniform": (40, 80, 600), "als": (38, 70, 560), "owl": (41, 75, 500)}.items():
        for sparsity, ppl in zip((0.5, 0.6, 0.7), values):
            for seed, jitter in ((0, 0.0), (1, 2.0)):
                records.append(record(allocation=allocation, sparsity=sparsity, seed=seed, ppl=ppl + jitter))
                records.append(record(method="sparsegpt", allocation=allocation, sparsity=sparsity, seed=seed,
                                      ppl=0.8 * ppl + jitter))
    written = write_report(records, tmp_path)
    assert [p.name for p in written] == ["RESULTS.md", "ppl_vs_sparsity_wanda_1.png", "ppl_vs_sparsity_sparsegpt_1.png"]
    for png in written[1:]:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
        assert f"]({png.name})" in written[0].read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_lru_cache_evicts_the_least_recently_used_and_counts_hits():
    cache = LRUCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1 and cache.hits == 1
    cache["c"] = 3
    assert set(cache) == {"a", "c"} and cache.get("b") is None and cache.hits == 1


def test_cost_keeps_evaluation_set_ups_apart():
    # a whole-test-set evaluation takes 7x the 40-window one: averaging them would misstate both
    short, full = record(allocation="uniform"), record(allocation="uniform", windows=291, sparsity=0.6)
    full["timings_s"]["eval"] = 35.0
    tasks = record(allocation="uniform", sparsity=0.7, tasks={"piqa": 0.6, "boolq": 0.5})
    tasks["timings_s"]["eval"] = 50.0
    cost = build_report([short, full, tasks], figures=False).markdown.split("## Cost")[1]
    assert "| wanda | uniform | 40 x 1024 windows | 1 | 1.0 | 2.0 | 10.0 | 5.0 | 20.0 | 1.25 |" in cost
    assert "| wanda | uniform | 291 x 1024 windows | 1 | 1.0 | 2.0 | 10.0 | 35.0 | 20.0 | 1.25 |" in cost
    assert "| wanda | uniform | 40 x 1024 windows + 2 tasks x 100 | 1 | 1.0 | 2.0 | 10.0 | 50.0 | 20.0 | 1.25 |" in cost
