"""Streaming from disk: blocks read from safetensors shards only while used, pruned blocks written
out as shards; identical to the in-memory path, and the output reloads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alsparse.api import prune_
from alsparse.checkpoint import BlockCheckpoints
from alsparse.cli import main
from alsparse.config import ALSOptions, BaselineOptions, PruneConfig
from alsparse.io import save
from alsparse.lazy import load_lazy
from alsparse.models import decoder_blocks, streamed

IDS = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))


def _source(tmp_path, family):
    path = tmp_path / f"{family}-src"
    make_tiny(family).save_pretrained(path, max_shard_size="40KB")  # several shards and an index
    return path


def _state(directory):
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


@pytest.mark.parametrize("family,method,allocation", [
    ("llama", "wanda", "als"),
    ("opt", "sparsegpt", "owl"),
    ("gpt2", "magnitude", "alphapruning"),
    ("gemma2", "sparsegpt", "uniform"),
    ("qwen3", "wanda", "atp"),
])
def test_from_disk_equals_in_memory(tmp_path, family, method, allocation):
    source = _source(tmp_path, family)
    config = PruneConfig(method=method, sparsity=0.6, allocation=allocation, als=ALSOptions(tokens=48),
                         baselines=BaselineOptions(atp_beta=0.1))
    in_ram = AutoModelForCausalLM.from_pretrained(source)
    expected = prune_(in_ram, IDS, config)
    save(in_ram, None, expected, tmp_path / "in-ram")

    lazy = load_lazy(source, torch.float32)
    assert all(p.is_meta for block in decoder_blocks(lazy) for p in block.parameters()), "blocks stay on disk"
    ckpt = BlockCheckpoints(tmp_path / "ckpt")
    report = prune_(lazy, IDS, config, checkpoint=ckpt)
    assert all(p.is_meta for block in decoder_blocks(lazy) for p in block.parameters()), "and are dropped after"
    save(lazy, None, report, tmp_path / "from-disk", checkpoints=ckpt)

    assert [r.mask_sha256 for r in report.linears] == [r.mask_sha256 for r in expected.linears]
    assert report.achieved_sparsity == expected.achieved_sparsity
    index = json.loads((tmp_path / "from-disk" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(decoder_blocks(lazy)) + 1, "one shard per block + the rest"
    want, got = _state(tmp_path / "in-ram"), _state(tmp_path / "from-disk")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    a, b = AutoModelForCausalLM.from_pretrained(tmp_path / "in-ram"), AutoModelForCausalLM.from_pretrained(
        tmp_path / "from-disk")
    assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_streamed_forward_from_disk_equals_full_forward(tmp_path):
    source = _source(tmp_path, "llama")
    full = AutoModelForCausalLM.from_pretrained(source).eval()
    lazy = load_lazy(source, torch.float32)
    with torch.no_grad(), streamed(lazy, torch.device("cpu")):
        got = lazy(IDS).logits
    torch.testing.assert_close(got, full(IDS).logits, rtol=0, atol=0)
    assert all(p.is_meta for block in decoder_blocks(lazy) for p in block.parameters())


def test_from_disk_resumes_after_interruption(tmp_path):
    source = _source(tmp_path, "llama")
    config = PruneConfig(method="sparsegpt", sparsity=0.5)
    expected = prune_(AutoModelForCausalLM.from_pretrained(source), IDS, config)

    def stop(index, total):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_(load_lazy(source, torch.float32), IDS, config, checkpoint=BlockCheckpoints(tmp_path / "ck"),
               on_block=stop)
    lazy = load_lazy(source, torch.float32)
    report = prune_(lazy, IDS, config, checkpoint=BlockCheckpoints(tmp_path / "ck"), resume=True)
    assert report.resumed_from_block == 2
    assert [r.mask_sha256 for r in report.linears] == [r.mask_sha256 for r in expected.linears]


@pytest.mark.parametrize("family", ["llama", "opt"])  # untied lm_head / tied, with learned positions
def test_non_block_weights_are_dropped_while_pruning_and_restored_after(tmp_path, family):
    source = _source(tmp_path, family)
    config = PruneConfig(method="wanda", sparsity=0.5)
    in_ram = AutoModelForCausalLM.from_pretrained(source).eval()
    prune_(in_ram, IDS, config)
    lazy = load_lazy(source, torch.float32)
    block_prefix = "model.layers." if family == "llama" else "model.decoder.layers."
    resident = {n: p.clone() for n, p in lazy.named_parameters() if not n.startswith(block_prefix)}
    seen = []

    def during(index, total):
        seen.append([n for n, p in lazy.named_parameters(remove_duplicate=False)
                     if not n.startswith(block_prefix) and not p.is_meta])

    prune_(lazy, IDS, config, checkpoint=BlockCheckpoints(tmp_path / "ck"), on_block=during)
    assert seen and all(held == [] for held in seen), "embeddings, norm and lm_head are off while blocks stream"
    after = dict(lazy.named_parameters())
    for name, value in resident.items():
        assert torch.equal(after[name], value), name
    if lazy.config.tie_word_embeddings:
        assert lazy.get_output_embeddings().weight is lazy.get_input_embeddings().weight, "tied again"

    def stop(index, total):
        raise KeyboardInterrupt

    interrupted = load_lazy(source, torch.float32)
    with pytest.raises(KeyboardInterrupt):
        prune_(interrupted, IDS, config, checkpoint=BlockCheckpoints(tmp_path / "ck2"), on_block=stop)
    assert not any(p.is_meta for n, p in interrupted.named_parameters() if not n.startswith(block_prefix)), \
        "restored after a failure too"


def test_from_disk_needs_checkpoints_and_no_sequential_strength_search(tmp_path):
    lazy = load_lazy(_source(tmp_path, "llama"), torch.float32)
    with pytest.raises(ValueError, match="checkpoint="):
        prune_(lazy, IDS, PruneConfig(method="wanda", sparsity=0.5))
    with pytest.raises(ValueError, match="strength_search='oneshot'"):
        prune_(lazy, IDS, PruneConfig(method="wanda", sparsity=0.5, allocation="atp", strength_search="sequential"),
               checkpoint=BlockCheckpoints(tmp_path / "ck"))


@pytest.mark.parametrize("allocation", ["atp", "als"])
def test_from_disk_strength_search_equals_in_memory(tmp_path, allocation):
    """The oneshot search streams blocks like everything else: from disk it chooses and prunes
    exactly as in memory."""
    source = _source(tmp_path, "llama")
    config = PruneConfig(method="wanda", sparsity=0.6, allocation=allocation, compute_dtype="float32",
                         als=ALSOptions(tokens=48), baselines=BaselineOptions(atp_grid=3))
    lazy = load_lazy(source, torch.float32)
    from_disk = prune_(lazy, IDS, config, checkpoint=BlockCheckpoints(tmp_path / "ck"))
    in_memory = prune_(make_tiny("llama"), IDS, config)
    disk, memory = (r.allocation["diagnostics"]["strength_search"] for r in (from_disk, in_memory))
    assert disk["chosen"] == memory["chosen"] and disk["candidates"] == memory["candidates"]
    assert disk["heldout_loss"] == pytest.approx(memory["heldout_loss"], rel=1e-6)  # summation order only
    assert [r.mask_sha256 for r in from_disk.linears] == [r.mask_sha256 for r in in_memory.linears]


def test_directory_without_safetensors_is_refused(tmp_path):
    path = tmp_path / "bin"
    make_tiny("llama").save_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_lazy(path, torch.float32)


def test_cli_prune_from_disk_with_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", str(tiny_model_dir / "model"), "--calib", str(tiny_model_dir / "corpus.txt"), "--nsamples", "4",
            "--seqlen", "16", "--out", str(out)]
    evaluation = ["--eval", "--eval-ppl", str(tiny_model_dir / "corpus.txt"), "--eval-seq-len", "32", "--eval-limit", "2"]
    assert main([*args, "--from-disk", *evaluation]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    dense, pruned = (next(iter(summary["eval"][k]["token_ppl"].values()))["ppl"] for k in ("dense", "pruned"))
    assert pruned != dense
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (out / "alsparse_eval.json").is_file() and not (tmp_path / "out.alsparse-ckpt").exists()
    assert json.loads((out / "alsparse_report.json").read_text())["config"]["batch_size"] == 1  # the lean default
    assert main([*args[:-1], str(tmp_path / "ram"), "--batch-size", "1"]) == 0
    assert json.loads((tmp_path / "ram" / "alsparse_report.json").read_text())["config"]["batch_size"] == 1
    capsys.readouterr()
    a, b = load_file(tmp_path / "ram" / "model.safetensors"), {}
    for shard in out.glob("model-*.safetensors"):
        b.update(load_file(shard))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main([*args, "--from-disk", "--no-checkpoint", "--overwrite"]) == 2
    assert "--no-checkpoint" in capsys.readouterr().err


def test_cli_eval_from_disk_matches_in_memory(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir / "model")
    corpus = ["--ppl", str(tiny_model_dir / "corpus.txt"), "--seq-len", "32", "--limit", "3"]
    assert main(["eval", model, "--json", str(tmp_path / "a.json"), *corpus]) == 0
    assert main(["eval", model, "--from-disk", "--json", str(tmp_path / "b.json"), *corpus]) == 0
    a, b = (json.loads((tmp_path / n).read_text())["token_ppl"] for n in ("a.json", "b.json"))
    assert a == b and next(iter(a.values()))["ppl"] > 1


def test_reads_bf16_shards_into_the_compute_dtype(tmp_path):
    path = tmp_path / "bf16"
    make_tiny("llama").to(torch.bfloat16).save_pretrained(path)
    expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lazy = load_lazy(path, torch.float32)
    with torch.no_grad(), streamed(lazy, torch.device("cpu")):
        got = lazy(IDS).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected(IDS).logits, rtol=0, atol=0)


def test_a_shard_cut_short_is_named_when_read(tmp_path):
    from alsparse.lazy import _header

    source = _source(tmp_path, "llama")
    lazy = load_lazy(source, torch.float32)
    shards = sorted(set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values()))
    for name in shards:  # a shard whose last tensor is a block's: cutting it breaks that block
        header = _header(source / name)[0]
        last = max(header, key=lambda k: header[k]["data_offsets"][1])
        if ".layers." in last:
            break
    shard = source / name
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=rf"{name}: tensor {last} is cut short"), streamed(lazy, torch.device("cpu")):
        lazy(IDS)
