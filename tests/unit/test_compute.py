"""Compute dtype apart from storage dtype (alsparse.compute): what auto resolves to, that fp32
compute is today's code path, and that bf16 compute lowers the forwards only: master weights,
saved dtype and calibration statistics stay in full precision."""

from __future__ import annotations

import pytest
import torch

from alsparse import compute
from alsparse.api import prune_
from alsparse.capture import BlockStep, capture_block_inputs, record_input_stats
from alsparse.config import ALSOptions, PruneConfig
from alsparse.eval import EvalConfig, evaluate
from alsparse.models import decoder_blocks, find_linears, layer_types

from conftest import make_tiny, tiny_tokenizer, word_text

CPU = torch.device("cpu")


def _no_torch_probe(monkeypatch):
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    _no_torch_probe(monkeypatch)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nflags : x\n")
    assert compute.cpu_flags(info) == {"avx512_bf16", "amx_bf16"}
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert compute.cpu_flags(info) == set()
    assert compute.cpu_flags(tmp_path / "missing") == set()


def test_cpu_flags_take_torchs_probe(tmp_path, monkeypatch):
    _no_torch_probe(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert compute.cpu_flags(tmp_path / "missing") == {"avx512_bf16"}


@pytest.mark.parametrize("flags,expected", [({"amx_bf16"}, torch.bfloat16), ({"avx512_bf16"}, torch.bfloat16),
                                            (set(), torch.float32)])
def test_auto_on_cpu_follows_the_bf16_flags(monkeypatch, flags, expected, caplog):
    monkeypatch.setattr(compute, "cpu_flags", lambda *a: set(flags))
    with caplog.at_level("INFO", logger="alsparse.compute"):
        assert compute.resolve("auto", CPU, torch.float32) == expected
    assert "compute dtype: " + compute.name(expected) in caplog.text  # the choice is logged, with why


def test_auto_keeps_half_precision_weights_and_explicit_dtypes_are_taken(monkeypatch):
    monkeypatch.setattr(compute, "cpu_flags", lambda *a: {"amx_bf16"})
    assert compute.resolve("auto", CPU, torch.float16) == torch.float16
    monkeypatch.setattr(compute, "cpu_flags", lambda *a: set())
    assert compute.resolve("auto", CPU, torch.bfloat16) == torch.bfloat16
    assert compute.resolve("bfloat16", CPU, torch.float32) == torch.bfloat16  # explicit: even where slow
    assert compute.resolve("float16", CPU, torch.float16) == torch.float16


def test_auto_on_cuda_asks_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute.resolve("auto", torch.device("cuda"), torch.float32) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute.resolve("auto", torch.device("cuda"), torch.float32) == torch.float32


def test_impossible_or_unknown_compute_dtypes_are_clear_errors():
    with pytest.raises(ValueError, match="needs float32 weights or float32 weights, but the model is bfloat16"):
        compute.resolve("float32", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="compute dtype 'bf16' is not valid; choose one of: auto, float32"):
        PruneConfig(compute_dtype="bf16")
    with pytest.raises(ValueError, match="compute dtype 'half' is not valid"):
        EvalConfig(compute_dtype="half")


def _calib(n=8, t=16, seed=1):
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _pruned(config, family="llama", calib=None):
    model = make_tiny(family)
    report = prune_(model, _calib() if calib is None else calib, config)
    return model, report


def test_float32_compute_never_enters_autocast(monkeypatch):
    """fp32 compute is today's code path: no autocast anywhere, so results are bit-identical."""
    def refuse(*args, **kwargs):
        raise AssertionError("autocast entered under float32 compute")

    monkeypatch.setattr(torch, "autocast", refuse)
    for method, allocation in (("wanda", "uniform"), ("sparsegpt", "als")):
        _, report = _pruned(PruneConfig(method=method, allocation=allocation, sparsity=0.5, compute_dtype="float32",
                                        als=ALSOptions(tokens=32)))
        assert report.compute_dtype == "float32"
    model = make_tiny("llama")
    assert evaluate(model, None, EvalConfig(ppl=(), compute_dtype="float32"))["compute_dtype"] == "float32"


def test_auto_without_fast_bf16_is_bit_identical_to_float32(monkeypatch):
    monkeypatch.setattr(compute, "cpu_flags", lambda *a: set())
    a, _ = _pruned(PruneConfig(method="sparsegpt", sparsity=0.6, compute_dtype="auto"))
    b, _ = _pruned(PruneConfig(method="sparsegpt", sparsity=0.6, compute_dtype="float32"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_compute_keeps_fp32_master_weights_and_saves_fp32(method, tmp_path):
    from safetensors.torch import load_file

    from alsparse.io import save

    model, report = _pruned(PruneConfig(method=method, sparsity=0.5, compute_dtype="bfloat16"))
    assert report.compute_dtype == "bfloat16" and report.summary()["compute_dtype"] == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert abs(report.achieved_sparsity - 0.5) < 1e-9
    save(model, tiny_tokenizer(), report, tmp_path / "out")
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {torch.float32}


def test_bf16_compute_lowers_the_linears_but_not_the_statistics():
    """Inside a bf16 forward the linears run in bf16, while each linear's input statistics are
    accumulated from its inputs in fp32/fp64, equal to a float64 reference to fp32 rounding (a
    Hessian taken under autocast would be off by ~1e-2)."""
    model = make_tiny("llama")
    acts = capture_block_inputs(model, _calib(), CPU, batch_size=4)
    block = decoder_blocks(model)[0]
    step = BlockStep(0, block, layer_types(model, 3)[0], acts, CPU, find_linears(block))
    seen_in, seen_out = {}, {}

    def spy(name):
        def hook(x, y):
            seen_in.setdefault(name, []).append(x.detach().clone())
            seen_out[name] = y.dtype
        return hook

    with compute.using(torch.bfloat16):
        step.run({ref.name: spy(ref.name) for ref in step.linears}, keep_outputs=False)
        stats = record_input_stats(step, norms=True, hessian=True)
    assert set(seen_out.values()) == {torch.bfloat16}
    q = stats["self_attn.q_proj"]
    assert q.xtx.dtype == torch.float64 and q.sq_norms.dtype == torch.float32
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen_in["self_attn.q_proj"]]).double()
    torch.testing.assert_close(q.xtx, x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.sq_norms.double(), (x * x).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2"])
def test_wanda_masks_under_bf16_compute_agree_with_fp32(family):
    calib = _calib(16, 32)
    a, _ = _pruned(PruneConfig(method="wanda", sparsity=0.5, compute_dtype="float32"), family, calib)
    b, _ = _pruned(PruneConfig(method="wanda", sparsity=0.5, compute_dtype="bfloat16"), family, calib)
    same = total = 0
    for block_a, block_b in zip(decoder_blocks(a), decoder_blocks(b)):
        for ra, rb in zip(find_linears(block_a), find_linears(block_b)):
            same += int(((ra.module.weight == 0) == (rb.module.weight == 0)).sum())
            total += ra.module.weight.numel()
    assert same / total >= 0.99, same / total


def test_evaluation_in_bf16_is_close_to_fp32_and_says_what_it_ran_in(tmp_path):
    model = make_tiny("llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(word_text(600))
    tok = tiny_tokenizer()
    fp32 = evaluate(model, tok, EvalConfig(ppl=(str(corpus),), seq_len=32, compute_dtype="float32"))
    bf16 = evaluate(model, tok, EvalConfig(ppl=(str(corpus),), seq_len=32, compute_dtype="bfloat16"))
    assert (fp32["compute_dtype"], bf16["compute_dtype"]) == ("float32", "bfloat16")
    a, b = fp32["token_ppl"][str(corpus)]["ppl"], bf16["token_ppl"][str(corpus)]["ppl"]
    assert a != b and abs(b / a - 1) < 0.02
    assert {p.dtype for p in model.parameters()} == {torch.float32}
