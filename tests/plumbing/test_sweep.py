"""`alsparse sweep` / `alsparse report` on a tiny saved model: a 2 x 2 grid end to end, the report's
numbers against the results file, resume after a kill, --limit-cells, YAML validation (exit 2),
protocols never mixed, and the SmolLM2 grid file."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from alsparse import cli, sweep
from alsparse.cli import main
from alsparse.results import build_report, write_report

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(root: Path, **overrides) -> dict:
    corpus = str(root / "corpus.txt")
    cfg = {
        "model": str(root / "model"),
        "calibration": {"corpus": corpus, "nsamples": 4, "seqlen": 16, "seeds": [0]},
        "eval": {"ppl": [corpus], "seq_len": 32, "limit": 3},
        "grid": [{"methods": ["wanda"], "allocations": ["uniform", "als"], "sparsities": [0.5, 0.7],
                  "als": {"tokens": 32}}],
    }
    cfg.update(overrides)
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ppl(record: dict) -> float:
    (result,) = record["eval"]["token_ppl"].values()
    return result["ppl"]


def _count_prunes(monkeypatch) -> list:
    calls = []
    real = sweep.prune_

    def counting(model, calibration, config, *args, **kwargs):
        calls.append((config.allocation, config.sparsity))
        return real(model, calibration, config, *args, **kwargs)

    monkeypatch.setattr(sweep, "prune_", counting)
    return calls


def test_sweep_2x2_end_to_end_report_and_resume(tiny_model_dir, tmp_path, capsys, caplog, monkeypatch):
    plots = tmp_path / "cell_plots"
    config = _write(tmp_path, _config(tiny_model_dir, plots_dir=str(plots)))
    results = tmp_path / "out" / "results.jsonl"
    calls = _count_prunes(monkeypatch)
    monkeypatch.setattr("alsparse.sweep._load_average", lambda: 0.5)  # an idle machine: timings count
    # and a full share of CPU for every cell (else a cell slowed by other work leaves the cost table)
    monkeypatch.setattr("alsparse.sweep._cpu_seconds", time.perf_counter)

    assert main(["sweep", str(config), "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["computed"] == 5
    assert "sweep" in captured.err  # the progress bar
    assert sorted(calls) == [("als", 0.5), ("als", 0.7), ("uniform", 0.5), ("uniform", 0.7)]

    records = _lines(results)
    assert [r["kind"] for r in records] == ["dense"] + ["pruned"] * 4
    assert len({r["id"] for r in records}) == 5
    pruned = {(r["config"]["allocation"], r["config"]["sparsity"]): r for r in records[1:]}
    for (allocation, sparsity), r in pruned.items():
        assert r["achieved_sparsity"] == pytest.approx(sparsity, abs=0.05)
        assert len(r["allocation"]["sparsity"]) == 3 and r["config"]["seed"] == 0
        assert {"load", "capture", "pass1", "allocation", "prune", "eval"} <= set(r["timings_s"])
        assert r["eval_s"] > 0 and r["peak_memory"]["peak_rss_gib"] > 0 and r["versions"]["torch"]
        assert set(r["stage_peak_rss_gib"]) == set(r["timings_s"]) and min(r["stage_peak_rss_gib"].values()) > 0
        assert r["peak_rss_cell_gib"] >= max(r["stage_peak_rss_gib"].values()), "the cell's peak covers its stages"
        (ppl,) = r["eval"]["token_ppl"].values()
        assert ppl["seq_len"] == 32 and ppl["windows"] == 3 and ppl["split"] == "file"
        assert r["calibration"]["windows"] == 4 and r["calibration"]["fingerprint"]
        cell_plots = plots / r["id"]
        assert (cell_plots / "allocation.png").stat().st_size > 0
        assert (cell_plots / "block_rm.png").is_file() == (allocation == "als")
    # ALS at 0.7 reuses the dense statistics pass of ALS at 0.5 (same model, calibration, options)
    assert not pruned[("als", 0.5)]["pass1_reused"] and pruned[("als", 0.7)]["pass1_reused"]
    assert pruned[("als", 0.5)]["allocation"]["sparsity"] != pruned[("uniform", 0.5)]["allocation"]["sparsity"]

    # the report: tables hold the results file's numbers, the figure is a real PNG
    report_dir = tmp_path / "report"
    assert main(["report", str(results), "--out", str(report_dir)]) == 0
    markdown = (report_dir / "RESULTS.md").read_text()
    assert capsys.readouterr().out.strip() == markdown.strip()
    png = report_dir / "ppl_vs_sparsity_wanda_1.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert f"Dense: {_ppl(records[0]):.2f}" in markdown
    assert "token-ppl, text file corpus.txt, seq_len 32, first 3 non-overlapping windows" in markdown
    for sparsity, label in ((0.5, "wanda 50%"), (0.7, "wanda 70%")):
        uniform, als = _ppl(pruned[("uniform", sparsity)]), _ppl(pruned[("als", sparsity)])
        assert _expected_row(label, uniform, als) in markdown.splitlines()
    assert "| wanda | als (tokens=32) | 3 x 32 windows | 2 |" in markdown  # cost: two cells per method/allocator
    machine = records[1]["machine"]
    assert machine["busy"] is False and machine["load_1m_start"] == 0.5 and machine["cpu_s"] > 0
    # cells timed beside other work keep their results but leave the cost table
    busy = [{**r, "machine": {**r["machine"], "busy": True}} if r["config"].get("allocation") == "als" else r
            for r in records]
    busy_md = build_report(busy, figures=False).markdown
    assert "| wanda | uniform | 3 x 32 windows | 2 |" in busy_md and "| wanda | als (tokens=32) |" not in busy_md
    assert "2 of 5 cells ran beside other work" in busy_md
    assert _expected_row("wanda 50%", _ppl(pruned[("uniform", 0.5)]), _ppl(pruned[("als", 0.5)])) \
        in busy_md.splitlines()

    # a kill mid-write: keep the dense cell and two pruned ones, plus half of the next line
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    calls.clear()
    caplog.clear()
    assert main(["sweep", str(config), "--results", str(results)]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 2
    assert "incomplete" in caplog.text
    redone = [(r["config"]["allocation"], r["config"]["sparsity"]) for r in records[3:]]
    assert calls == redone
    final = _lines(results)
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in records)
    for before, after in zip(records[3:], final[3:]):  # deterministic: the same numbers again
        assert _ppl(after) == pytest.approx(_ppl(before), rel=1e-6)

    calls.clear()
    assert main(["sweep", str(config), "--results", str(results)]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 0 and calls == []
    assert len(_lines(results)) == 5


def test_limit_cells_and_dry_run(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tiny_model_dir, grid=[{"methods": "magnitude", "allocations": "uniform",
                                         "sparsities": [0.3, 0.5, 0.7]}])
    config = _write(tmp_path, cfg)
    default_results = tmp_path / "sweep.results.jsonl"  # no 'results' key, no --results: beside the YAML
    assert main(["sweep", str(config), "--limit-cells", "2"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["computed"] == 2 and outcome["remaining"] == 2
    assert len(_lines(default_results)) == 2
    assert main(["sweep", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(" done ") == 2 and out.count(" todo ") == 2 and "4 cells planned, 2 done, 2 to compute" in out
    assert len(_lines(default_results)) == 2  # a dry run computes nothing
    assert main(["sweep", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 2
    assert [r["config"].get("sparsity", 0.0) for r in _lines(default_results)] == [0.0, 0.3, 0.5, 0.7]


def _expected_row(label: str, uniform: float, other: float) -> str:
    """A perplexity table row: lowest as printed in bold (a tie: neither), the other column's difference to
    uniform in parentheses."""
    u_text, o_text = f"{uniform:.2f}", f"{other:.2f}"
    if round(uniform, 2) < round(other, 2):
        u_text = f"**{u_text}**"
    elif round(other, 2) < round(uniform, 2):
        o_text = f"**{o_text}**"
    return f"| {label} | {u_text} | {o_text} ({other - uniform:+.2f}) |"


def test_report_never_mixes_protocols(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tiny_model_dir, grid=[
        {"methods": "magnitude", "allocations": ["uniform", "atp"], "sparsities": 0.5, "baselines": {"atp_beta": 0.1}},
        {"methods": "magnitude", "allocations": ["uniform", "atp"], "sparsities": 0.5, "baselines": {"atp_beta": 0.1},
         "eval": {"seq_len": 16, "tasks": ["piqa"], "task_limit": 4}},
    ])
    results = tmp_path / "results.jsonl"
    assert main(["sweep", str(_write(tmp_path, cfg)), "--results", str(results)]) == 0
    records = _lines(results)
    assert [r["kind"] for r in records].count("dense") == 2  # one dense cell per evaluation set-up
    assert main(["report", str(results), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    sections = (tmp_path / "RESULTS.md").read_text().split("\n### ")
    for seq_len in (32, 16):
        (section,) = [s for s in sections if s.startswith(f"token-ppl, text file corpus.txt, seq_len {seq_len},")]
        mine = {r["label"]: r for r in records if r["eval_config"]["seq_len"] == seq_len}
        assert f"Dense: {_ppl(mine['dense']):.2f}." in section
        rows = [line for line in section.splitlines() if line.startswith("| magnitude")]
        assert rows == [_expected_row("magnitude 50%", _ppl(mine["uniform"]), _ppl(mine["atp (atp_beta=0.1)"]))]
    (zero_shot,) = [s for s in sections if s.startswith("Zero-shot: piqa (acc_norm, n=4)")]
    with_tasks = {r["label"]: r for r in records if r["eval_config"]["tasks"]}
    assert f"Dense mean: {100 * with_tasks['dense']['eval']['tasks_mean']['value']:.2f}." in zero_shot
    piqa = with_tasks["uniform"]["eval"]["tasks"]["piqa"]["value"]
    assert f"| magnitude 50% | uniform | {100 * piqa:.2f} |" in zero_shot


def _bad(cfg_root, mutate):
    cfg = _config(cfg_root)
    mutate(cfg)
    return cfg


BAD = [
    (lambda c: c.update(modle="x"), "unknown key 'modle'; allowed keys: model,"),
    (lambda c: c.pop("grid"), "missing required key 'grid'"),
    (lambda c: c["grid"][0].update(method="wanda"), "grid[0]: unknown key 'method'"),
    (lambda c: c["grid"][0].update(methods=["wanda", "bogus"]),
     "grid[0].methods: unknown pruning method 'bogus'; choose one of: magnitude, sparsegpt, wanda"),
    (lambda c: c["grid"][0].update(allocations=["nope"]),
     "grid[0].allocations: unknown allocator 'nope'; choose one of:"),
    (lambda c: c["grid"][0].update(sparsities=[0.5, 1.0]), "grid[0].sparsities: sparsity must be in [0, 1), got 1.0"),
    (lambda c: c["grid"][0].update(sparsities=[-0.1]), "sparsity must be in [0, 1), got -0.1"),
    (lambda c: c["grid"][0].update(patterns=["2-4"]), "grid[0].patterns: pattern '2-4' is malformed"),
    (lambda c: c["grid"][0].update(patterns=["4:4"]), "N:M needs 0 < N < M"),
    (lambda c: c["grid"][0].pop("sparsities"), "missing required key 'sparsities'"),
    (lambda c: c["grid"][0].update(als={"deltaa": 0.1}), "grid[0].als: unknown option 'deltaa'; choose one of: level,"),
    (lambda c: c["grid"][0].update(als={"delta": [0.1, 1.5]}), "als delta must be in [0, 1), got 1.5"),
    (lambda c: c["grid"][0].update(baselines={"owl_lambda": "lots"}), "grid[0].baselines.owl_lambda must be a number"),
    (lambda c: c["grid"][0].update(search={"budgett": 8}), "grid[0].search: unknown option 'budgett'; choose one of: budget,"),
    (lambda c: c["grid"][0].update(search={"fitness": "l2"}), "search fitness 'l2'"),
    (lambda c: c["grid"][0].update(search={"budget": "lots"}), "grid[0].search.budget must be an integer"),
    (lambda c: c["grid"][0].update(search={"stages": [[4, 1, 256]]}), "grid[0].search.stages: not an axis a sweep varies"),
    (lambda c: c["calibration"].update(nsamples=0), "calibration.nsamples must be a positive integer, got 0"),
    (lambda c: c["calibration"].update(corpus="c4"), "calibration.corpus: 'c4' is neither a registered corpus"),
    (lambda c: c["eval"].update(tasks=["nope"]), "eval: unknown task 'nope'; choose one of:"),
    (lambda c: c["grid"][0].update(eval={"limit": 0}), "grid[0].eval: limit must be a positive integer"),
    (lambda c: c.update(dtype="float8"), "dtype 'float8' is not valid"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m.split(";")[0][:48] for _, m in BAD])
def test_bad_sweep_config_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, mutate, message):
    config = _write(tmp_path, _bad(tiny_model_dir, mutate))
    results = tmp_path / "results.jsonl"
    assert main(["sweep", str(config), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not results.exists()


def test_unreadable_sweep_inputs_exit_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("grid: [unclosed\n")
    assert main(["sweep", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"id": "a", "kind": "dense"}\nnot json\n{"id": "b", "kind": "dense"}\n')
    assert main(["report", str(corrupt), "--out", str(tmp_path / "r")]) == 2
    assert "line 2 is not a valid result record" in capsys.readouterr().err
    assert not (tmp_path / "r" / "RESULTS.md").exists()


def test_failing_cell_keeps_finished_cells_and_keep_going_skips_it(tiny_model_dir, tmp_path, capsys):
    # 3:6 cannot fit the tiny model's 32 inputs: the error surfaces when that cell prunes
    cfg = _config(tiny_model_dir, grid=[{"methods": "magnitude", "allocations": "uniform", "sparsities": 0.5,
                                         "patterns": ["unstructured", "3:6"]}])
    config, results = _write(tmp_path, cfg), tmp_path / "results.jsonl"
    assert main(["sweep", str(config), "--results", str(results)]) == 2
    assert "divisible by 6" in capsys.readouterr().err
    assert [r["config"].get("pattern") for r in _lines(results)] == [None, "unstructured"]
    assert main(["sweep", str(config), "--results", str(results), "--keep-going"]) == 1
    outcome = json.loads(capsys.readouterr().out)
    assert (outcome["computed"], outcome["failed"], outcome["remaining"]) == (0, 1, 1)
    assert len(_lines(results)) == 2


def test_a_results_file_in_use_is_refused(tiny_model_dir, tmp_path, capsys):
    import subprocess
    import sys
    import textwrap

    results = tmp_path / "results.jsonl"
    results.write_text("")
    config = _write(tmp_path, _config(tiny_model_dir))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from alsparse.locks import exclusive, lock_path_for
        with exclusive(lock_path_for({str(results)!r}), "results"):
            print("holding", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert main(["sweep", str(config), "--results", str(results)]) == 2
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert f"results file {results} is in use by another alsparse run" in capsys.readouterr().err
    assert results.read_text() == ""


def test_smollm2_grid_file_plans_the_issue_grid():
    spec = sweep.load_spec(REPO / "benchmarks" / "sweeps" / "smollm2.yaml")
    assert spec.model == "smollm2-135m"
    pruned = [c for c in spec.cells if c.kind == "pruned"]
    full_test = [c for c in pruned if c.eval["limit"] is None]  # the whole test set, time permitting: last
    assert {(c.prune.method, c.allocator_label, c.prune.sparsity) for c in full_test} == {
        ("wanda", "uniform", 0.5), ("wanda", "als", 0.5)} and list(spec.cells[-len(full_test) - 1:]) == [
        sweep.Cell("dense", spec.model, spec.dtype, full_test[0].eval)] + full_test
    pruned = [c for c in pruned if c not in full_test]
    main_grid = [c for c in pruned if c.name is None and c.prune.pattern == "unstructured" and c.prune.seed == 0]
    combos = {(c.prune.method, c.allocator_label, c.prune.sparsity) for c in main_grid}
    labels = {"uniform", "owl", "dlp", "alphapruning", "atp", "als", "als (solver=qp)"}
    assert combos == {(m, a, s) for m in ("magnitude", "wanda", "sparsegpt") for a in labels for s in (0.5, 0.6, 0.7)}
    assert len(main_grid) == len(combos), "no configuration is pruned twice (zero-shot cells give the ppl too)"
    nm = {(c.prune.method, c.allocator_label, c.prune.pattern) for c in pruned if c.prune.pattern != "unstructured"}
    assert nm == {(m, a, p) for m in ("wanda", "sparsegpt") for a in ("uniform", "owl", "als") for p in ("2:4", "4:8")}
    for cell in pruned:
        assert (cell.calibration.corpus, cell.calibration.seqlen) == ("wikitext2", 1024)
        assert cell.eval["ppl"] == ["wikitext2"] and cell.eval["seq_len"] == 1024 and cell.eval["limit"] == 40
        with_tasks = (cell.name is None and cell.prune.sparsity in (0.5, 0.7) and cell.prune.pattern == "unstructured"
                      and cell.prune.seed == 0 and cell.prune.method in ("wanda", "sparsegpt")
                      and cell.prune.allocation in ("uniform", "owl", "als"))
        assert bool(cell.eval["tasks"]) == with_tasks and (cell.eval["task_limit"] == 100) == with_tasks
    assert {c.prune.seed for c in main_grid} == {0} and any(c.prune.seed == 1 for c in pruned)
    assert {c.name for c in pruned} - {None} == {"delta", "granularity", "calib_size", "feature", "normalize",
                                                 "expression", "level"}
    calib_sizes = {c.calibration.nsamples for c in pruned if c.name == "calib_size"}
    assert len(calib_sizes) >= 3 and 32 in calib_sizes
    assert len({c.id for c in spec.cells}) == len(spec.cells)


def test_search_grid_file_plans_the_issue_rows():
    spec = sweep.load_spec(REPO / "benchmarks" / "sweeps" / "smollm2_search.yaml")
    assert spec.compute_dtype == "bfloat16" and all(c.compute == "bfloat16" for c in spec.cells)
    pruned = [c for c in spec.cells if c.kind == "pruned"]
    main_grid = [c for c in pruned if c.name is None]
    assert {(c.prune.method, c.allocator_label, c.prune.sparsity, c.prune.seed) for c in main_grid} == {
        (m, a, s, seed) for m in ("wanda", "sparsegpt") for a in ("uniform", "search") for s in (0.5, 0.6, 0.7)
        for seed in (0, 1)}
    assert len(main_grid) == 24
    for cell in pruned:
        assert cell.eval["ppl"] == ["wikitext2", "ptb"] and cell.eval["limit"] == 40
        like_main = (cell.name is None or (cell.name == "final" and cell.prune.method == "wanda")
                     or (cell.name == "database" and cell.prune.sparsity == 0.7))  # the main grid's work
        assert bool(cell.eval["tasks"]) == (cell.prune.sparsity == 0.7 and like_main)
        assert not cell.search or cell.prune.allocation == "search"
    ablations = {(c.name, c.prune.method, c.allocator_label) for c in pruned if c.name}
    assert ablations == {("budget", "wanda", "search (budget=96)"), ("budget", "wanda", "search (budget=192)"),
                         ("budget", "wanda", "search (budget=768)"), ("fitness", "wanda", "search (fitness=kl)"),
                         ("final", "wanda", "search (final=sequential)"),
                         ("final", "sparsegpt", "search (final=assembled, database=dense)"),
                         ("database", "sparsegpt", "search (database=dense)"), ("database", "sparsegpt", "search"),
                         ("database_first", "sparsegpt", "search")}
    budget_96 = next(c for c in pruned if c.search.get("budget") == 96)
    assert budget_96.prune.search.budget == 96
    assert budget_96.config()["search"] == {"budget": 96, "final": "assembled"}  # Wanda's default way, named
    assert "search" not in main_grid[0].config(), "cells without search options keep the ids recorded before them"
    # the way the final model is made is in a cell's identity unless it is sequential (what the first
    # search cells were recorded with): SparseGPT's default cells keep their ids, Wanda's do not
    searched = {(c.name, c.prune.method): c for c in pruned if c.prune.allocation == "search"
                and c.prune.sparsity == 0.7 and c.prune.seed == 0 and c.name in (None, "final")}
    assert searched[(None, "wanda")].config()["search"] == {"final": "assembled"}
    assert searched[("final", "wanda")].config().get("search") is None
    # SparseGPT's level database is in the identity unless it is dense (the first cells' inputs): its
    # default cells, now sequential, are the [database] ablation's sequential work, its dense ones the
    # work the main grid's SparseGPT cells were recorded with (search: {})
    assert searched[(None, "sparsegpt")].config()["search"] == {"database": "sequential"}
    assert searched[("final", "sparsegpt")].config()["search"] == {"final": "assembled"}  # recorded dense
    database = {(c.prune.sparsity, c.prune.seed, c.allocator_label): c for c in pruned if c.name == "database"}
    assert len(database) == 12
    main = {(c.prune.sparsity, c.prune.seed): c for c in main_grid
            if c.prune.method == "sparsegpt" and c.prune.allocation == "search"}
    for (sparsity, seed), cell in main.items():
        dense = database[(sparsity, seed, "search (database=dense)")]
        assert dense.config().get("search") is None and dense.eval == cell.eval  # the first cells' work
        assert database[(sparsity, seed, "search")].work_key == cell.work_key  # the default's work
        assert dense.varied == {"search.database": "dense"}
    first = [c for c in pruned if c.name == "database_first"]
    assert len(first) == 2 and all(c.config() == main[(0.7, c.prune.seed)].config() for c in first)
    assert searched[("final", "sparsegpt")].allocator_label == "search (final=assembled, database=dense)"
    assert len({c.id for c in spec.cells}) == len(spec.cells)


def test_a_search_cell_runs_with_its_options(tiny_model_dir, tmp_path, capsys):
    grid = [{"methods": "magnitude", "allocations": ["uniform", "search"], "sparsities": 0.5,
             "search": {"budget": [4], "step": 0.1, "span": 0.2}}]
    cfg = _config(tiny_model_dir, grid=grid, dense=False)
    results = tmp_path / "results.jsonl"
    assert main(["sweep", str(_write(tmp_path, cfg)), "--results", str(results)]) == 0
    records = {r["label"]: r for r in _lines(results)}
    assert set(records) == {"uniform", "search (budget=4, step=0.1)"}
    searched = records["search (budget=4, step=0.1)"]
    assert searched["config"]["search"] == {"budget": 4, "step": 0.1, "final": "assembled"}  # magnitude: assembled
    assert "search" not in records["uniform"]["config"]
    levels = {round(s, 6) for s in searched["allocation"]["sparsity"]}
    assert levels <= {0.3, 0.4, 0.5, 0.6, 0.7}, levels  # on the searched grid: target +- span in steps of 0.1
    assert abs(searched["achieved_sparsity"] - 0.5) < 1e-4


def test_dense_cells_one_per_evaluation_unless_turned_off(tiny_model_dir):
    cfg = _config(tiny_model_dir)
    cfg["grid"].append({"methods": "magnitude", "allocations": "uniform", "sparsities": 0.5, "eval": {"limit": 2}})
    spec = sweep.parse_spec(cfg)
    dense = [c for c in spec.cells if c.kind == "dense"]
    assert [c.eval["limit"] for c in dense] == [3, 2]
    # each dense cell runs just before the first cell evaluated its way, not all of them first
    assert spec.cells[0] == dense[0] and spec.cells[-2:] == (dense[1], spec.cells[-1])
    assert not [c for c in sweep.parse_spec({**cfg, "dense": False}).cells if c.kind == "dense"]
    with pytest.raises(sweep.SweepConfigError, match="dense must be true or false"):
        sweep.parse_spec({**cfg, "dense": "no"})


def test_sweep_and_report_through_alsparse_main(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tiny_model_dir, grid=[{"methods": "magnitude", "allocations": "uniform", "sparsities": 0.5}])
    results = tmp_path / "results.jsonl"
    assert cli.main(["sweep", str(_write(tmp_path, cfg)), "--results", str(results)]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 2
    assert cli.main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    assert "| magnitude 50% |" in (tmp_path / "report" / "RESULTS.md").read_text()
    bad = _config(tiny_model_dir, grid=[{"methods": "magnitude", "allocations": "uniform", "sparsities": 1.5}])
    assert cli.main(["sweep", str(_write(tmp_path, bad, "bad.yaml"))]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_an_ablation_default_reuses_the_main_grid_cell(tiny_model_dir, tmp_path, capsys, monkeypatch):
    grid = [{"methods": ["wanda"], "allocations": ["als"], "sparsities": [0.5], "als": {"tokens": 32}},
            {"name": "delta", "methods": ["wanda"], "allocations": ["als"], "sparsities": [0.5],
             "als": {"tokens": 32, "delta": [0.2, 0.1]}}]  # 0.2 is the default: the main grid's cell
    config = _write(tmp_path, _config(tiny_model_dir, grid=grid))
    results = tmp_path / "results.jsonl"
    calls = _count_prunes(monkeypatch)
    monkeypatch.setattr("alsparse.sweep._load_average", lambda: 0.5)
    assert main(["sweep", str(config), "--results", str(results)]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 4  # dense, main, two ablation rows
    assert len(calls) == 2, "the ablation's default value is not pruned again"
    records = {(r["name"], r["label"]): r for r in _lines(results)}
    main_cell, copy = records[(None, "als (tokens=32)")], records[("delta", "als (tokens=32)")]
    assert copy["reused_from"] == main_cell["id"] and copy["id"] != main_cell["id"]
    assert _ppl(copy) == _ppl(main_cell) and copy["varied"] == {"als.delta": 0.2}
    assert "reused_from" not in records[("delta", "als (delta=0.1, tokens=32)")]
    markdown = build_report(list(records.values()), figures=False).markdown
    assert "| wanda | als (tokens=32) | 3 x 32 windows | 1 |" in markdown  # the copy is not counted twice in cost


def _md_images(markdown: str) -> list[str]:
    """The targets of the Markdown image links."""
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def test_report_figures_subdir_zero_shot_figure_and_chosen_cells(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative plots_dir: the records hold the figures' paths relative to here
    cfg = _config(tiny_model_dir, plots_dir="cell_plots",
                  grid=[{"methods": ["wanda"], "allocations": ["uniform", "als"], "sparsities": [0.5, 0.7],
                         "als": {"tokens": 32}, "eval": {"tasks": ["piqa"], "task_limit": 4}}])
    results = tmp_path / "results.jsonl"
    assert main(["sweep", str(_write(tmp_path, cfg)), "--results", str(results)]) == 0
    records = _lines(results)
    dense = records[0]
    cell = {(r["config"]["allocation"], r["config"]["sparsity"]): r for r in records[1:]}
    als, uniform = cell[("als", 0.5)], cell[("uniform", 0.7)]

    # --figures: the PNGs in OUT/results, the links relative to RESULTS.md; --cell by prefix and by full id
    out = tmp_path / "docs"
    assert main(["report", str(results), "--out", str(out), "--figures", "results",
                 "--cell", als["id"][:8], "--cell", uniform["id"], "--cell", als["id"]]) == 0
    capsys.readouterr()
    markdown = (out / "RESULTS.md").read_text()
    assert not list(out.glob("*.png"))
    links = _md_images(markdown)
    expected = {"ppl_vs_sparsity_wanda_1.png", "zero_shot_1.png", f"cell_{als['id']}_allocation.png",
                f"cell_{als['id']}_block_rm.png", f"cell_{uniform['id']}_allocation.png"}
    assert sorted(links) == sorted(f"results/{name}" for name in expected)
    for link in links:
        _assert_png(out / link)
    assert {p.name for p in (out / "results").iterdir()} == expected  # no temporary file left behind
    for c, name in ((als, "allocation.png"), (als, "block_rm.png"), (uniform, "allocation.png")):
        copied = out / "results" / f"cell_{c['id']}_{name}"
        assert copied.read_bytes() == (tmp_path / "cell_plots" / c["id"] / name).read_bytes()

    # the zero-shot figure sits under the mean table, before the per-task table
    zero_shot = markdown.split("## Zero-shot accuracy")[1].split("\n## ")[0]
    assert zero_shot.index("| wanda 70% |") < zero_shot.index("(results/zero_shot_1.png)") < zero_shot.index("Per task")

    # the chosen cells: once each, in the order given, described, every image captioned
    chosen = markdown.split("## Figures of chosen cells")[1]
    assert chosen.count("### Cell ") == 2 and chosen.index(als["id"]) < chosen.index(f"### Cell `{uniform['id']}`")
    protocol = "token-ppl, text file corpus.txt, seq_len 32, first 3 non-overlapping windows"
    assert (f"wanda, allocator als (tokens=32), sparsity 50%, calibration seed 0; {protocol}: {_ppl(als):.2f}."
            in chosen.splitlines())
    assert (f"wanda, allocator uniform, sparsity 70%, calibration seed 0; {protocol}: {_ppl(uniform):.2f}."
            in chosen.splitlines())
    assert (f"![RM heat map: the Redundancy Metric RM(i, j) between every pair of blocks]"
            f"(results/cell_{als['id']}_block_rm.png)") in chosen
    assert chosen.count("*allocated sparsity per block (bars) against the target sparsity (dashed line).*") == 2

    # the default: figures beside RESULTS.md, plain links
    plain = tmp_path / "plain"
    assert main(["report", str(results), "--out", str(plain)]) == 0
    capsys.readouterr()
    plain_links = _md_images((plain / "RESULTS.md").read_text())
    assert sorted(plain_links) == ["ppl_vs_sparsity_wanda_1.png", "zero_shot_1.png"]
    for link in plain_links:
        _assert_png(plain / link)

    # what the zero-shot figure draws: a bar per row and allocator at the mean accuracy, the dense mean dashed
    # (the tiny model scores the same on every cell: distinct means make the bars' order visible)
    means = {r["id"]: 0.30 + 0.01 * i for i, r in enumerate(records)}
    distinct = [{**r, "eval": {**r["eval"], "tasks_mean": {**r["eval"]["tasks_mean"], "value": means[r["id"]]}}}
                for r in records]
    report = build_report(distinct)
    figure = report.figures["zero_shot_1.png"]
    try:
        (ax,) = figure.axes
        for bars, allocation in zip(ax.containers, ("uniform", "als")):
            heights = [bar.get_height() for bar in bars]
            assert heights == pytest.approx([100 * means[cell[(allocation, s)]["id"]] for s in (0.5, 0.7)])
        (line,) = ax.get_lines()
        assert line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(100 * means[dense["id"]])
        assert "4 items per task" in ax.get_title() and str(tiny_model_dir / "model") in ax.get_title()
        assert ax.get_xlabel() and ax.get_ylabel() == "zero-shot mean accuracy (%)"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[0].startswith("dense (") and legend[1:] == ["uniform", "als (tokens=32)"]
    finally:
        import matplotlib.pyplot as plt

        for fig in report.figures.values():
            plt.close(fig)

    # the Python API: figures_dir below out_dir, RESULTS.md first in what was written
    written = write_report(records, tmp_path / "api", figures_dir="figs", cells=[uniform["id"]])
    assert written[0] == tmp_path / "api" / "RESULTS.md"
    assert {p.parent for p in written[1:]} == {tmp_path / "api" / "figs"}
    assert f"(figs/cell_{uniform['id']}_allocation.png)" in written[0].read_text()

    # bad --cell ids and a missing figure: exit 2 with the reason, nothing written
    for args, message in (
        (["--cell", "ffffffffffff"], "'ffffffffffff': 0 of 5 cell ids match"),
        (["--cell", als["id"][:3]], "a prefix needs at least 6 characters"),
        (["--cell", dense["id"]], f"cell {dense['id']}: its record lists no figures"),
    ):
        assert main(["report", str(results), "--out", str(tmp_path / "bad"), *args]) == 2
        assert message in capsys.readouterr().err
    # the sweep's figures gone (a fresh clone): drawn again from the record's numbers...
    for path in map(Path, als["plots"]):
        path.unlink()
    assert main(["report", str(results), "--out", str(tmp_path / "again"), "--cell", als["id"]]) == 0
    capsys.readouterr()
    for path in map(Path, als["plots"]):
        assert path.name in ("allocation.png", "block_rm.png")
        _assert_png(tmp_path / "again" / f"cell_{als['id']}_{path.name}")
    assert len(als["allocation"]["block_rm"]) == 3  # the block RM matrix travels in the record
    # ... unless the record lacks them
    missing = Path("cell_plots") / uniform["id"] / "allocation.png"
    missing.unlink()
    stripped = tmp_path / "stripped.jsonl"
    stripped.write_text("".join(json.dumps({**r, "allocation": {}}) + "\n" for r in records))
    assert main(["report", str(stripped), "--out", str(tmp_path / "bad"), "--cell", uniform["id"]]) == 2
    err = capsys.readouterr().err
    assert f"cell {uniform['id']}: figure {missing} does not exist" in err
    assert not (tmp_path / "bad").exists()


def test_an_ambiguous_cell_prefix_is_refused():
    record = {"kind": "pruned", "label": "uniform", "plots": [],
              "config": {"model": "m", "method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "seed": 0}}
    records = [{**record, "id": "abcdef0000000001"}, {**record, "id": "abcdef0000000002"}]
    with pytest.raises(ValueError, match="'abcdef': 2 of 2 cell ids match: abcdef0000000001, abcdef0000000002"):
        build_report(records, figures=False, cells=["abcdef"])
    with pytest.raises(ValueError, match="cell abcdef0000000001: its record lists no figures"):
        build_report(records, figures=False, cells=["abcdef0000000001"])


def test_report_preamble_and_regenerate_command(tmp_path, capsys):
    record = {"id": "abcdef0000000001", "kind": "dense", "label": "dense", "config": {"model": "m"},
              "eval_config": {}, "eval": {"token_ppl": {}, "tasks": {}}}
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(record) + "\n")
    preamble = tmp_path / "pre.md"
    preamble.write_text("Status: 1 of 131 cells.\n\nALS wins nothing yet.\n")
    out = tmp_path / "docs"
    assert main(["report", str(results), "--out", str(out), "--preamble", str(preamble)]) == 0
    markdown = (out / "RESULTS.md").read_text()
    lines = markdown.splitlines()
    assert lines[:5] == ["# Sweep results", "", "Status: 1 of 131 cells.", "", "ALS wins nothing yet."]
    assert f"Regenerate this file with `alsparse report {results} --out {out} --preamble {preamble}`." in markdown
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(out), "--preamble", str(tmp_path / "missing.md")]) == 2
    assert "cannot read the preamble" in capsys.readouterr().err
    assert (out / "RESULTS.md").read_text() == markdown  # the earlier report is untouched


def test_a_results_file_replaced_mid_run_loses_no_record(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """``git stash`` / ``git checkout`` replace the file a running sweep appends to: the sweep must
    notice, reopen the path and re-append this run's records that the new file lacks."""
    grid = [{"methods": "magnitude", "allocations": "uniform", "sparsities": [0.3, 0.5, 0.7]}]
    spec = sweep.parse_spec(_config(tiny_model_dir, grid=grid))
    results = tmp_path / "results.jsonl"
    run, ran = sweep._Runner.run, []

    def run_then_replace(self, cell):
        record = run(self, cell)
        ran.append(cell.id)
        if len(ran) == 3:  # dense and the first pruned cell are in the file: put back an older version of it
            older = results.read_text().splitlines(keepends=True)[:1]
            tmp = tmp_path / "older.jsonl"
            tmp.write_text("".join(older))
            os.replace(tmp, results)
        return record

    monkeypatch.setattr(sweep._Runner, "run", run_then_replace)
    with caplog.at_level(logging.WARNING):
        outcome = sweep.run_sweep(spec, results=results, progress=False)
    assert len(outcome.computed) == 4 and "re-appended the 1 record(s)" in caplog.text
    ids = [r["id"] for r in _lines(results)]
    assert sorted(ids) == sorted(ran) and len(set(ids)) == 4


def test_compute_dtype_is_resolved_once_and_never_shares_a_table(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """auto resolves when the sweep is planned; fp32 cells keep the ids they had before compute dtype
    was an option, bf16 cells are other cells, prune and evaluate in bf16, and the report gives them
    their own table."""
    import alsparse.compute

    monkeypatch.setattr(alsparse.compute, "cpu_flags", lambda *a: set())  # a CPU without fast bf16
    grid = [{"methods": "wanda", "allocations": "uniform", "sparsities": 0.5}]
    legacy = sweep.parse_spec(_config(tiny_model_dir, grid=grid))
    auto = sweep.parse_spec(_config(tiny_model_dir, grid=grid, compute_dtype="auto"))
    bf16 = sweep.parse_spec(_config(tiny_model_dir, grid=grid, compute_dtype="bfloat16"))
    assert [c.id for c in auto.cells] == [c.id for c in legacy.cells] and auto.compute_dtype == "float32"
    assert "compute_dtype" not in legacy.cells[1].config()
    assert not {c.id for c in bf16.cells} & {c.id for c in legacy.cells}
    assert bf16.cells[1].config()["compute_dtype"] == "bfloat16" and bf16.cells[1].prune.compute_dtype == "bfloat16"
    monkeypatch.setattr(alsparse.compute, "cpu_flags", lambda *a: {"amx_bf16"})
    assert sweep.parse_spec(_config(tiny_model_dir, grid=grid)).compute_dtype == "bfloat16"
    with pytest.raises(sweep.SweepConfigError, match="compute_dtype: compute dtype 'bf16' is not valid"):
        sweep.parse_spec(_config(tiny_model_dir, grid=grid, compute_dtype="bf16"))

    results = tmp_path / "results.jsonl"
    for dtype in ("float32", "bfloat16"):
        config = _write(tmp_path, _config(tiny_model_dir, grid=grid, compute_dtype=dtype), f"{dtype}.yaml")
        assert main(["sweep", str(config), "--results", str(results)]) == 0
    records = _lines(results)
    assert len(records) == 4
    assert [r["compute_dtype"] for r in records] == ["float32"] * 2 + ["bfloat16"] * 2
    assert [r["eval"]["compute_dtype"] for r in records] == ["float32"] * 2 + ["bfloat16"] * 2
    assert [r["prune_config"]["compute_dtype"] for r in records if r["kind"] == "pruned"] == ["float32", "bfloat16"]
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "RESULTS.md").read_text()
    model = str(tiny_model_dir / "model")
    assert f"{model} (bfloat16 compute)" in text and text.count("| wanda 50% |") >= 2


def test_a_cells_search_records_reach_the_results_file(tiny_model_dir, tmp_path):
    """ATP's strength search (candidates, held-out losses, choice) and the searched allocation's
    record (warm starts, trace, final held-out figures, seconds per phase) are kept per cell."""
    grid = [{"methods": ["wanda"], "allocations": ["atp", "search"], "sparsities": [0.6],
             "search": {"budget": [24]}}]
    config = _write(tmp_path, _config(tiny_model_dir, grid=grid))
    results = tmp_path / "results.jsonl"
    assert main(["sweep", str(config), "--results", str(results)]) == 0
    cells = {r["config"]["allocation"]: r for r in _lines(results) if r["kind"] == "pruned"}
    atp = cells["atp"]["allocation"]
    assert len(atp["strength_search"]["candidates"]) == len(atp["strength_search"]["heldout_loss"]) > 1
    assert "search" not in atp
    found = cells["search"]["allocation"]["search"]
    assert found["warm_starts"] and found["offsets"] and "evolution_s" in found["seconds"]
    assert found["final"] == "assembled" and found["final_heldout_nll"] > 0  # Wanda's default way
