"""The CUDA path against the CPU path, on tiny random models. Skipped where no CUDA GPU is visible
(CI has none); run on a GPU machine with ``pytest tests/gpu``.

What has to hold: the same pruning on CPU and CUDA in float32 allocates the same per-unit sparsity
and reaches the same per-layer sparsity; the masks agree (bit for bit for magnitude, whose scores
are the weights themselves; nearly so where the scores go through reductions whose rounding
differs between devices); bfloat16 on CUDA prunes to the allocated ratios and keeps the dtype;
streaming from disk onto CUDA gives the in-memory CUDA result; the CLI runs end to end on CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM

from alsparse.api import prune_
from alsparse.checkpoint import BlockCheckpoints
from alsparse.cli import main
from alsparse.config import ALSOptions, PruneConfig
from alsparse.lazy import load_lazy
from alsparse.models import decoder_blocks, find_linears

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

IDS = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def _masks(model) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{ref.name}": (ref.module.weight.detach() == 0).cpu()
        for i, block in enumerate(decoder_blocks(model))
        for ref in find_linears(block)
    }


def _loss(model, device) -> float:
    ids = IDS.to(device)
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


@pytest.mark.parametrize("family,method,allocation,pattern,agreement", [
    ("llama", "magnitude", "uniform", "unstructured", 1.0),
    ("llama", "wanda", "als", "unstructured", 0.995),
    ("llama", "sparsegpt", "owl", "unstructured", 0.98),
    ("opt", "wanda", "uniform", "unstructured", 0.995),
    ("qwen3", "sparsegpt", "als", "unstructured", 0.98),
    ("llama", "wanda", "uniform", "2:4", 0.995),
])
def test_cuda_prunes_like_cpu(family, method, allocation, pattern, agreement):
    # float32 compute on both devices (auto would pick bf16 on the GPU): this compares devices
    config = PruneConfig(method=method, sparsity=0.6, allocation=allocation, pattern=pattern,
                         als=ALSOptions(tokens=64), compute_dtype="float32")
    on_cpu, on_gpu = make_tiny(family), make_tiny(family).to("cuda")
    want = prune_(on_cpu, IDS, config)
    got = prune_(on_gpu, IDS, config)

    assert next(on_gpu.parameters()).device.type == "cuda", "the model stays where it was"
    assert [r.name for r in got.linears] == [r.name for r in want.linears]
    for w, g in zip(want.linears, got.linears):
        assert g.allocated == pytest.approx(w.allocated, abs=1e-4), f"{g.name}: allocation differs between devices"
        assert g.achieved == pytest.approx(w.achieved, abs=1e-9), f"{g.name}: per-layer sparsity differs"
    masks_cpu, masks_gpu = _masks(on_cpu), _masks(on_gpu)
    same = sum(int((masks_cpu[k] == masks_gpu[k]).sum()) for k in masks_cpu)
    total = sum(m.numel() for m in masks_cpu.values())
    assert same / total >= agreement, f"masks agree on {same / total:.4%} of weights"
    if agreement == 1.0:
        assert [r.mask_sha256 for r in got.linears] == [r.mask_sha256 for r in want.linears]
    assert _loss(on_gpu, "cuda") == pytest.approx(_loss(on_cpu, "cpu"), rel=0.02)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bfloat16_on_cuda_prunes_to_the_allocation(method):
    config = PruneConfig(method=method, sparsity=0.6, allocation="als", als=ALSOptions(tokens=64),
                         compute_dtype="auto")  # bf16 weights: compute in bf16; the fp32 reference below too
    reference_config = PruneConfig(method=method, sparsity=0.6, allocation="als", als=ALSOptions(tokens=64),
                                   compute_dtype="float32")
    model = make_tiny("llama").to("cuda", torch.bfloat16)
    report = prune_(model, IDS, config)
    reference = make_tiny("llama").to("cuda")
    expected = prune_(reference, IDS, reference_config)

    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for record in report.linears:
        assert record.achieved == pytest.approx(record.allocated, abs=1.0 / 32), record.name  # a row of 32 or more
    assert report.achieved_sparsity == pytest.approx(expected.achieved_sparsity, abs=0.01)
    loss = _loss(model, "cuda")
    assert loss == loss and loss < 2 * _loss(reference, "cuda"), "bf16 pruning must not wreck the model"
    masks_bf16, masks_fp32 = _masks(model), _masks(reference)
    same = sum(int((masks_bf16[k] == masks_fp32[k]).sum()) for k in masks_fp32)
    total = sum(m.numel() for m in masks_fp32.values())
    assert same / total > 0.9, f"bf16 and fp32 masks agree on only {same / total:.2%}"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_auto_compute_on_cuda_is_bf16_with_fp32_master_weights(method):
    model = make_tiny("llama").to("cuda")
    report = prune_(model, IDS, PruneConfig(method=method, sparsity=0.6, compute_dtype="auto"))
    reference = make_tiny("llama").to("cuda")
    prune_(reference, IDS, PruneConfig(method=method, sparsity=0.6, compute_dtype="float32"))
    assert report.compute_dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    masks, masks_fp32 = _masks(model), _masks(reference)
    same = sum(int((masks[k] == masks_fp32[k]).sum()) for k in masks_fp32)
    assert same / sum(m.numel() for m in masks_fp32.values()) >= 0.98


def test_from_disk_onto_cuda_equals_in_memory_cuda(tmp_path):
    source = tmp_path / "src"
    make_tiny("llama").save_pretrained(source, max_shard_size="40KB")
    config = PruneConfig(method="sparsegpt", sparsity=0.6, allocation="als", device="cuda", als=ALSOptions(tokens=64),
                         compute_dtype="float32")  # two paths compared bit for bit
    in_memory = AutoModelForCausalLM.from_pretrained(source).to("cuda")
    want = prune_(in_memory, IDS, config)
    lazy = load_lazy(source, torch.float32)
    got = prune_(lazy, IDS, config, checkpoint=BlockCheckpoints(tmp_path / "ckpt"))
    assert [r.mask_sha256 for r in got.linears] == [r.mask_sha256 for r in want.linears]
    assert all(p.is_meta for block in decoder_blocks(lazy) for p in block.parameters()), "blocks go back to disk"


def test_cli_prune_and_eval_on_cuda(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", str(tiny_model_dir / "model"), "--calib", str(tiny_model_dir / "corpus.txt"),
                 "--nsamples", "4", "--seqlen", "16", "--device", "cuda", "--allocation", "als", "--als-tokens", "32",
                 "--sparsity", "0.6", "--eval", "--eval-limit", "4", "--eval-seq-len", "16",
                 "--eval-ppl", str(tiny_model_dir / "corpus.txt"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["achieved_sparsity"] == pytest.approx(0.6, abs=0.02)
    report = json.loads((out / "alsparse_report.json").read_text())
    assert "peak_cuda_gib" in report["peak_memory"]
    assert AutoModelForCausalLM.from_pretrained(out) is not None
