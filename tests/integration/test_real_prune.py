"""The real SmolLM2-135M and the real WikiText-2 validation text, through the CLI and the API."""

from __future__ import annotations

import json

import pytest

from alsparse.cli import main

pytestmark = pytest.mark.integration


def _run(model_dir, out, *extra):
    return main(["prune", str(model_dir), "--calib", "wikitext2", "--nsamples", "4", "--seqlen", "256",
                 "--batch-size", "4", "--out", str(out), *extra])


def test_wanda_50_through_the_cli(real_model_dir, tmp_path, capsys):
    out = tmp_path / "wanda50"
    assert _run(real_model_dir, out, "--method", "wanda", "--sparsity", "0.5") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)  # 576 and 1536 inputs: exact per row
    assert summary["prunable_weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    report = json.loads((out / "alsparse_report.json").read_text())
    assert report["calibration"]["source"] == "wikitext2 validation"
    assert len(report["linears"]) == 210
    assert all(abs(r["achieved"] - 0.5) < 1e-9 for r in report["linears"])


@pytest.mark.parametrize("sparsity,solver", [(0.5, "lp"), (0.7, "graded")])
def test_als_on_the_real_model(real_model_dir, tmp_path, capsys, sparsity, solver):
    out = tmp_path / f"als{sparsity}"
    assert _run(real_model_dir, out, "--method", "wanda", "--sparsity", str(sparsity), "--allocation", "als",
                "--als-solver", solver) == 0
    capsys.readouterr()
    report = json.loads((out / "alsparse_report.json").read_text())
    alloc = report["allocation"]
    if solver == "graded":  # the default: its strength chosen on the held-out calibration window
        search = alloc["diagnostics"]["strength_search"]
        assert search["candidates"][0] == 0.0 and len(search["heldout_loss"]) == len(search["candidates"]) == 7
        assert (search["fit_windows"], search["heldout_windows"]) == (3, 1)
        assert search["heldout_loss"][search["candidates"].index(search["chosen"])] == min(search["heldout_loss"])
    if solver == "lp" or search["chosen"] > 0:
        assert len(set(round(s, 4) for s in alloc["sparsity"])) > 1, "ALS must not be uniform on a real model"
    assert alloc["mean_sparsity"] == pytest.approx(sparsity, abs=1e-6)
    assert report["summary"]["achieved_sparsity"] == pytest.approx(sparsity, abs=1e-4)  # exact counts
    assert min(alloc["sparsity"]) >= sparsity - 0.2 - 1e-9 and max(alloc["sparsity"]) <= sparsity + 0.2 + 1e-9
    rm = alloc["diagnostics"]["block_rm"]
    off = [rm[i][j] for i in range(30) for j in range(30) if i != j]
    assert max(off) - min(off) > 0.2, "with centred features the RM matrix must be informative, not all ~1"
    assert (out / "block_rm.png").is_file() and (out / "allocation.png").is_file()


def test_quality_ordering_dense_wanda_magnitude(real_model_dir):
    """Sanity: token-ppl(dense) < token-ppl(Wanda 50%) < token-ppl(magnitude 50%)."""

    import alsparse
    from alsparse.data.calibration import load_calibration

    def ppl(model, tokenizer):
        cfg = alsparse.EvalConfig(ppl=("wikitext2",), seq_len=1024, limit=3)
        return alsparse.evaluate(model, tokenizer, cfg)["token_ppl"]["wikitext2"]["ppl"]

    model, tokenizer = alsparse.load_model(str(real_model_dir))
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = ppl(model, tokenizer)
    calib = load_calibration(tokenizer, nsamples=4, seqlen=256, seed=0)
    alsparse.prune_(model, calib, alsparse.PruneConfig(method="wanda", sparsity=0.5))
    wanda = ppl(model, tokenizer)
    model.load_state_dict(dense_state)
    alsparse.prune_(model, None, alsparse.PruneConfig(method="magnitude", sparsity=0.5))
    magnitude = ppl(model, tokenizer)
    assert dense < wanda < magnitude, (dense, wanda, magnitude)
    assert wanda < 2.5 * dense and magnitude > 3 * dense
