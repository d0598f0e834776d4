"""The CLI in-process on a tiny saved model: happy paths and every bad-input row (exit codes,
messages, nothing written)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from alsparse.cli import main


def _prune_args(root, out, *extra):
    return ["prune", str(root / "model"), "--calib", str(root / "corpus.txt"), "--nsamples", "4", "--seqlen", "16",
            "--out", str(out), *extra]


def _snapshot(path):
    return sorted((p.relative_to(path), p.read_bytes()) for p in path.rglob("*") if p.is_file())


def test_prune_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(_prune_args(tiny_model_dir, out, "--allocation", "als", "--als-tokens", "32", "--sparsity", "0.6"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["achieved_sparsity"] == pytest.approx(0.6, abs=0.02)
    assert summary["calibration"]["windows"] == 4 and summary["calibration"]["seq_len"] == 16
    assert "block  allocated  achieved" in captured.err
    report = json.loads((out / "alsparse_report.json").read_text())
    assert report["config"]["allocation"] == "als" and report["calibration"]["fingerprint"]
    assert (out / "block_rm.png").is_file() and (out / "allocation.png").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    zeros = sum(int((p == 0).sum()) for n, p in reloaded.named_parameters() if "layers" in n and n.endswith("proj.weight"))
    assert zeros > 0


def test_prune_cli_searched_allocation(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "searched"
    code = main(_prune_args(tiny_model_dir, out, "--allocation", "search", "--sparsity", "0.6", "--search-budget",
                            "40", "--search-offspring", "4", "--als-tokens", "32", "--search-database", "sequential"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["achieved_sparsity"] == pytest.approx(0.6, abs=1e-4)
    report = json.loads((out / "alsparse_report.json").read_text())
    record = report["allocation"]["diagnostics"]["search"]
    assert record["budget_window_forwards"] == 40 and record["window_forwards"] <= 40
    assert record["database"] == "sequential"
    assert (out / "search_fitness.png").is_file() and (out / "search_allocation.png").is_file()


def test_ls_lists_registries(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("magnitude", "wanda", "sparsegpt", "uniform", "als", "owl", "dlp", "alphapruning", "atp", "file", "search"):
        assert name in out


BAD = [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--pattern", "2-4"], "malformed"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "3:6"], "divisible by 6"),
    (["--method", "bogus"], "choose one of: magnitude, sparsegpt, wanda"),
    (["--allocation", "bogus"], "choose one of:"),
    (["--allocation", "search", "--search-step", "0.5"], "step and span"),
    (["--allocation", "search", "--search-fitness", "l2"], "--search-fitness: invalid choice: 'l2'"),
    (["--allocation", "search", "--search-database", "pruned"], "--search-database: invalid choice: 'pruned'"),
    (["--als-level", "bogus"], "als level"),
    (["--allocation", "als", "--als-bounds", "absolute"], "needs s_min and s_max"),
    (["--allocation", "als", "--als-bounds", "absolute", "--als-smin", "0.6", "--als-smax", "0.8"], "infeasible"),
    (["--seqlen", "100000"], "longer than the model's context"),
    (["--nsamples", "0"], "--nsamples must be >= 1"),
    (["--sparsity", "50"], "got 50.0 (did you mean 0.5?)"),
    (["--allocation", "als", "--als-strength-grid", "0,x"], "--als-strength-grid must be comma-separated numbers"),
    (["--allocation", "als", "--als-strength", "-0.1"], "als strength must be in [0, 1)"),
    (["--strength-search", "bogus"], "strength_search 'bogus' is not valid; choose one of: oneshot, sequential"),
    (["--compute-dtype", "bf16"], "compute dtype 'bf16' is not valid; choose one of: auto, float32, bfloat16, float16"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--dtype", "bfloat16", "--compute-dtype", "float32"], "compute dtype float32 needs float32 weights"),
]


def test_every_prune_option_has_help(capsys):
    try:
        assert main(["prune", "--help"]) == 0
    except SystemExit as exc:  # argparse's own exit, if main lets it through
        assert exc.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, words in (("--seed", "same seed, same masks"), ("--overwrite", "replace an existing"),
                        ("--trust-remote-code", "own Python code"), ("--owl-lambda", "2 x lambda"),
                        ("--owl-m", "outlier"), ("--dlp-alpha", "2 x alpha"), ("--alpha-eps", "eps"),
                        ("--dtype", "default float32"), ("--als-strength", "held-out calibration")):
        assert flag in text and words in text, flag


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    before = _snapshot(tiny_model_dir)
    out = tmp_path / "out"
    assert main(_prune_args(tiny_model_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert _snapshot(tiny_model_dir) == before


def test_existing_output_is_refused_then_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(_prune_args(tiny_model_dir, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
    assert main(_prune_args(tiny_model_dir, out, "--overwrite")) == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()


def test_unreadable_model_path(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a local directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prune", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_shorter_than_one_window(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the of and\n")
    out = tmp_path / "out"
    args = ["prune", str(tiny_model_dir / "model"), "--calib", str(short), "--nsamples", "2", "--seqlen", "16", "--out", str(out)]
    assert main(args) == 2
    assert "tokens" in capsys.readouterr().err
    assert not out.exists()


def test_headline_protocol_figures_carry_no_note():
    from alsparse.eval.api import format_results, headline_note

    row = {"corpus": "wikitext2", "split": "test", "seq_len": 1024, "windows": 40, "tokens": 40920, "bos": False,
           "ppl": 19.06}
    assert headline_note({"wikitext2": row}) == ""
    assert "note:" not in format_results({"token_ppl": {"wikitext2": row}})
    other = {**row, "seq_len": 2048, "windows": 141}
    assert "seq_len 2048, 141 windows" in headline_note({"wikitext2": row, "ptb": other})


def test_the_window_flag_is_named_seq_len_everywhere(tiny_model_dir, tmp_path, capsys):
    for command, flags in (("prune", ("--seq-len", "--eval-seq-len")), ("eval", ("--seq-len",))):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
        text = capsys.readouterr().out
        for flag in flags:
            assert f"{flag} " in text, (command, flag)
        assert "--seqlen" not in text, "the old name is only a hidden alias"
    out = tmp_path / "out"
    args = [a if a != "--seqlen" else "--seq-len" for a in _prune_args(tiny_model_dir, out)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["seq_len"] == 16
    assert main([*_prune_args(tiny_model_dir, tmp_path / "old"), "--method", "magnitude"]) == 0, "--seqlen still works"


def test_usage_mistakes_are_reported_before_torch_loads(tmp_path):
    import subprocess
    import sys

    probe = ("import sys\nfrom alsparse.cli import main\n"
             f"code = main(['prune', 'smollm2-135m', '--sparsity', '50', '--out', {str(tmp_path / 'o')!r}])\n"
             "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "did you mean 0.5?" in done.stderr
    for bad, message in ((["--pattern", "2-4"], "malformed"), (["--nsamples", "0"], "--nsamples must be >= 1"),
                         (["--compute-dtype", "fp8"], "compute dtype 'fp8' is not valid")):
        probe2 = probe.replace("'--sparsity', '50'", ", ".join(repr(b) for b in bad))
        done = subprocess.run([sys.executable, "-c", probe2], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["2", "False", "False"] and message in done.stderr, done.stderr


def test_the_package_still_gives_its_submodules_as_attributes():
    import subprocess
    import sys

    probe = ("import sys, alsparse\nprint(alsparse.sweep.__name__, alsparse.io.__name__, alsparse.PruneConfig.__name__)\n"
             "try:\n    alsparse.nope\nexcept AttributeError as exc:\n    print('AttributeError', exc)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["alsparse.sweep alsparse.io PruneConfig",
                                        "AttributeError module 'alsparse' has no attribute 'nope'"], done.stderr


def test_uniform_prune_prints_one_table_row_and_what_to_do_next(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_prune_args(tiny_model_dir, out, "--method", "magnitude", "--eval", "--eval-ppl",
                            str(tiny_model_dir / "corpus.txt"), "--eval-seq-len", "32", "--eval-limit", "2")) == 0
    err = capsys.readouterr().err
    import re

    assert re.search(r"^all\s+0\.5000\s+0\.5000\s+27648\s+\(all 3 blocks at the same ratio\)$", err, re.M)
    assert "(--eval-seq-len 1024 --eval-limit 40)" in err, "prune's note names prune's own flags"
    (dense_pruned,) = [line for line in err.splitlines() if line.startswith("token-ppl ")]
    assert "seq_len 32, 2 windows" in dense_pruned
    dense, pruned = (float(x) for x in dense_pruned.split()[-2:])
    assert dense > 1 and pruned > 1 and dense != pruned
    assert err.rindex("next: evaluate it") > err.rindex("token-ppl "), "what a person reads comes last"
    assert f"next: evaluate it with  alsparse eval {out} --ppl wikitext2,ptb --seq-len 1024 --limit 40" in err
    assert f"AutoModelForCausalLM.from_pretrained({str(out)!r})" in err


def test_usage_error_from_argparse_is_exit_2(capsys):
    assert main(["prune"]) == 2
    assert main(["frobnicate"]) == 2


def test_eval_cli_writes_json_and_prints_protocols(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    code = main(["eval", str(tiny_model_dir / "model"), "--ppl", str(tiny_model_dir / "corpus.txt"),
                 "--seq-len", "32", "--limit", "3", "--json", str(out), "--stream"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "token-ppl" in printed and "word-ppl" not in printed
    # 3 windows of 32 are not the docs' protocol: the output says which one the docs use
    assert ("note: this token-ppl used seq_len 32, 3 windows; the figures in README and docs/RESULTS.md use the "
            "first 40 windows of 1024 tokens (--seq-len 1024 --limit 40)") in printed
    result = json.loads(out.read_text())
    (ppl,) = result["token_ppl"].values()
    assert ppl["windows"] == 3 and ppl["seq_len"] == 32 and ppl["ppl"] > 1


EVAL_BAD = [
    (["--tasks", "nope"], "choose one of:"),
    (["--ppl", "nope"], "choose one of:"),
    (["--seq-len", "100000"], "exceeds the model's context"),
]


@pytest.mark.parametrize("extra,message", EVAL_BAD)
def test_eval_bad_input_exits_2(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir / "model"), "--json", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_eval_missing_data_names_where_it_looked(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALSPARSE_DATA", str(tmp_path / "no-data"))
    assert main(["eval", str(tiny_model_dir / "model"), "--ppl", "wikitext2", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no-data") in err and "ALSPARSE_DATA" in err


def test_model_without_tokenizer_is_a_clear_error(tmp_path, capsys):
    from conftest import make_tiny

    make_tiny("llama").save_pretrained(tmp_path / "bare")
    assert main(["eval", str(tmp_path / "bare"), "--limit", "1"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_corrupt_gguf_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALSPARSE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["prune", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-converted is cached


def _copy_model(tiny_model_dir, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, root)
    return root


def test_truncated_safetensors_is_a_clear_error_and_nothing_is_written(tiny_model_dir, tmp_path, capsys):
    root = _copy_model(tiny_model_dir, tmp_path)
    weights = root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    before = _snapshot(root)
    out = tmp_path / "out"
    assert main(_prune_args(root, out)) == 2
    err = capsys.readouterr().err
    assert "cannot load model from" in err and str(root / "model") in err
    assert not out.exists() and not list(tmp_path.glob("out*"))
    assert _snapshot(root) == before


def test_prune_without_tokenizer_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    root = _copy_model(tiny_model_dir, tmp_path)
    for f in (root / "model").iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    before = _snapshot(root)
    assert main(_prune_args(root, tmp_path / "out")) == 2
    assert "cannot load a tokenizer from" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and _snapshot(root) == before


def test_malformed_task_row_names_file_and_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    (data / "tasks").mkdir(parents=True)
    good = '{"query": "Question: g\\n", "choices": ["a", "b"], "gold": 0}\n'
    (data / "tasks" / "piqa.jsonl").write_text(good * 2 + '{"query": "Question: g\\n", "choices": ["a", "b"]}\n')
    monkeypatch.setenv("ALSPARSE_DATA", str(data))
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir / "model"), "--ppl", "", "--tasks", "piqa", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'tasks' / 'piqa.jsonl'}:3: malformed piqa row: missing field 'gold'" in err
    assert not out.exists()


def test_unwritable_output_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(_prune_args(tiny_model_dir, blocker / "out")) == 2
    assert f"{blocker} is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


def test_read_only_output_location_is_refused(tiny_model_dir, tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions; /proc refuses new files even to root
            locked = __import__("pathlib").Path("/proc")
        assert main(_prune_args(tiny_model_dir, locked / "out")) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_remote_code_is_never_run_without_the_flag(tmp_path, capsys):
    """A model directory whose config asks for custom code: refused, and the code never runs."""
    import json as _json

    model = tmp_path / "remote"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "config.json").write_text(_json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert main(["prune", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_failed_save_leaves_the_previous_output_intact(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Disk full while writing: the previous output is untouched and no temporary is left behind."""
    import errno

    out = tmp_path / "out"
    assert main(_prune_args(tiny_model_dir, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full_disk)
    assert main(_prune_args(tiny_model_dir, out, "--sparsity", "0.7", "--overwrite")) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == \
        ["out", "out.alsparse-ckpt"], "no temporary left; the checkpoints stay so the run can be resumed once space is freed"


def test_eval_with_the_lm_eval_harness_prints_both_tables(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model = str(tiny_model_dir / "model")
    assert main(["eval", model, "--tasks", "copa", "--harness", "lm-eval", "--ppl", ""]) == 2
    assert "--harness lm-eval: no lm-eval definition here for copa" in capsys.readouterr().err
    assert main(["eval", model, "--harness", "lm-eval", "--ppl", ""]) == 2
    assert "name at least one" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert main(["eval", model, "--tasks", "rte", "--task-limit", "3", "--ppl", "", "--harness", "lm-eval",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("zero-shot") < printed.index("lm-eval 0.4.13") < printed.index("alsparse_rte")
    results = json.loads(out.read_text())
    ours, theirs = results["tasks"]["rte"]["acc"], results["lm_eval"]["rte"]["acc,none"]
    assert results["tasks"]["rte"]["n"] == 3 and ours == pytest.approx(theirs)
