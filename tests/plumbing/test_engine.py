"""Engine contracts on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alsparse.api import prune_
from alsparse.capture import capture_block_inputs, stream_blocks
from alsparse.config import PruneConfig
from alsparse.io import measure_sparsity, save
from alsparse.models import UnsupportedModelError, decoder_blocks, find_linears
from alsparse.pruning import PRUNERS
from conftest import make_tiny


def _block_outputs_full(model, ids):
    """Outputs of every block during one ordinary full forward."""
    outs, handles = [], []
    for block in decoder_blocks(model):
        handles.append(block.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_streamed_forward_equals_full_forward(tiny_family, calib_ids):
    model = make_tiny(tiny_family)
    expected = _block_outputs_full(model, calib_ids)  # one micro-batch of 4
    acts = capture_block_inputs(model, calib_ids, torch.device("cpu"), batch_size=2)
    for step in stream_blocks(model, acts, torch.device("cpu")):
        step.outputs = step.run()
        got = torch.cat(step.outputs)
        torch.testing.assert_close(got, expected[step.index], rtol=1e-5, atol=1e-5)
    assert _hook_count(model) == 0


@pytest.mark.parametrize("method", PRUNERS.names())
def test_sparsity_zero_leaves_logits_unchanged(tiny_family, calib_ids, method):
    model = make_tiny(tiny_family)
    with torch.no_grad():
        before = model(calib_ids).logits
    prune_(model, calib_ids, PruneConfig(method=method, sparsity=0.0, batch_size=2))
    with torch.no_grad():
        after = model(calib_ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("method", PRUNERS.names())
def test_achieved_equals_allocated_and_state_restored(tiny_family, calib_ids, method):
    model = make_tiny(tiny_family)
    emb_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    model.train()
    model.config.use_cache = True
    report = prune_(model, calib_ids, PruneConfig(method=method, sparsity=0.5, batch_size=3))
    assert model.training and model.config.use_cache is True
    assert _hook_count(model) == 0
    assert len(report.linears) == sum(len(find_linears(b)) for b in decoder_blocks(model))
    for rec in report.linears:
        # k = floor(s * group) per comparison group: a whole matrix, a row, or a SparseGPT column block
        assert rec.achieved == pytest.approx(rec.allocated, abs=0.02), rec.name
        assert rec.achieved <= rec.allocated + 1e-9
    measured = measure_sparsity(model)
    assert measured["total"] == pytest.approx(report.achieved_sparsity, abs=1e-12)
    # embeddings and lm_head are never pruned
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    assert torch.equal(model.get_output_embeddings().weight, head_before)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns_are_exact(calib_ids, pattern):
    n, m = map(int, pattern.split(":"))
    model = make_tiny("llama")
    prune_(model, calib_ids, PruneConfig(method="wanda", pattern=pattern))
    for block in decoder_blocks(model):
        for ref in find_linears(block):
            zeros = (ref.weight_oi == 0).reshape(-1, m).sum(dim=1)
            assert torch.all(zeros == n), ref.name


def test_save_reload_identical_logits(tiny_family, calib_ids, tmp_path):
    model = make_tiny(tiny_family)
    report = prune_(model, calib_ids, PruneConfig(method="wanda", sparsity=0.5))
    out = save(model, None, report, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, reloaded(calib_ids).logits)
    assert (out / "alsparse_report.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".pruned.lock"]  # no temp dirs left


def test_save_refuses_existing_dir_and_leaves_it(tmp_path, calib_ids):
    model = make_tiny("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        save(model, None, None, out)
    assert (out / "keep.txt").read_text() == "mine"
    save(model, None, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_unsupported_family_lists_supported():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="supported: .*llama"):
        prune_(model, torch.randint(0, 50, (1, 8)), PruneConfig())


def test_nm_incompatible_width_is_a_clear_error(calib_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=36, intermediate_size=60, num_attention_heads=3,
                                         num_key_value_heads=3, num_hidden_layers=1))
    with pytest.raises(ValueError, match="divisible by 8"):
        prune_(model, calib_ids, PruneConfig(pattern="4:8"))


def test_deterministic_masks(calib_ids):
    hashes = []
    for _ in range(2):
        model = make_tiny("llama")
        report = prune_(model, calib_ids, PruneConfig(method="sparsegpt", sparsity=0.6))
        hashes.append([r.mask_sha256 for r in report.linears])
    assert hashes[0] == hashes[1]


def test_linears_fed_the_same_input_share_statistics(calib_ids):
    from alsparse.capture import record_input_stats
    from alsparse.pruning import InputStats

    model = make_tiny("llama")
    acts = capture_block_inputs(model, calib_ids, torch.device("cpu"), batch_size=2)
    step = next(stream_blocks(model, acts, torch.device("cpu")))
    shared = record_input_stats(step, norms=True, hessian=True)
    assert shared["self_attn.q_proj"] is shared["self_attn.k_proj"] is shared["self_attn.v_proj"]
    assert shared["mlp.gate_proj"] is shared["mlp.up_proj"]
    assert shared["mlp.gate_proj"] is not shared["self_attn.q_proj"]  # same shape, different tensor
    # identical to accumulating every linear separately
    separate = {ref.name: InputStats(ref.in_features, "cpu", True, True) for ref in step.linears}
    step.run({n: (lambda x, y, s=s: s.update(x)) for n, s in separate.items()}, keep_outputs=False)
    for name, s in separate.items():
        torch.testing.assert_close(shared[name].xtx, s.xtx)
        assert shared[name].tokens == s.tokens == calib_ids.numel()


def test_activations_head_takes_whole_micro_batches(calib_ids):
    acts = capture_block_inputs(make_tiny("llama"), calib_ids, torch.device("cpu"), batch_size=3)
    assert [h.shape[0] for h in acts.hidden] == [3, 1]
    head = acts.head(2)
    assert len(head.hidden) == 1 and head.tokens == 3 * 16
    assert all(len(calls) == 1 for calls in head.calls.values())
    assert acts.head(None) is acts and acts.head(100).tokens == acts.tokens


def test_streamed_forward_is_exact_and_leaves_no_hooks(calib_ids):
    from alsparse.models import streamed

    model = make_tiny("llama")
    with torch.no_grad():
        expected = model(calib_ids).logits
        with streamed(model, torch.device("cpu")):
            got = model(calib_ids).logits
    assert torch.equal(got, expected)
    assert _hook_count(model) == 0


def _poisoned(path: str, value: float):
    model = make_tiny("llama")
    with torch.no_grad():
        model.get_submodule(path).weight.fill_(value)
    return model


def test_overflowing_block_output_names_the_block_and_the_remedy(calib_ids):
    model = _poisoned("model.layers.1.mlp.down_proj", float("inf"))
    with pytest.raises(FloatingPointError, match=r"block 1: its outputs contain NaN/Inf.*bf16 or fp32"):
        prune_(model, calib_ids, PruneConfig(method="magnitude", sparsity=0.5, allocation="owl"))


@pytest.mark.parametrize("method,what", [("wanda", "input norms"), ("sparsegpt", "Hessian")])
def test_overflowing_statistics_name_the_linear(calib_ids, method, what):
    model = _poisoned("model.layers.1.mlp.up_proj", 1e30)  # down_proj's input overflows when squared
    with pytest.raises(FloatingPointError, match=rf"block 1 mlp.down_proj: NaN/Inf in the calibration {what}"):
        prune_(model, calib_ids, PruneConfig(method=method, sparsity=0.5))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_weights_with_float_statistics(calib_ids, method):
    """The GPU configuration on CPU: bf16 weights and activations, statistics accumulated in
    float64; the pruned model stays bf16 and hits its targets exactly."""
    model = make_tiny("llama").to(torch.bfloat16)
    report = prune_(model, calib_ids, PruneConfig(method=method, sparsity=0.5))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for rec in report.linears:
        assert rec.allocated - 0.05 <= rec.achieved <= rec.allocated + 1e-9, rec.name
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids).logits.float()).all()


def test_equal_call_arguments_are_held_once_across_micro_batches(calib_ids):
    model = make_tiny("llama")
    acts = capture_block_inputs(model, torch.cat([calib_ids, calib_ids[:1]]), torch.device("cpu"), batch_size=2)
    calls = next(iter(acts.calls.values()))
    assert len(calls) == 3  # micro-batches of 2, 2 and 1 windows
    first, later = calls[0].kwargs, [c.kwargs for c in calls[1:]]
    cos, sin = first["position_embeddings"]
    for kwargs in later:  # same positions in every window: one copy, not one per micro-batch
        assert kwargs["position_embeddings"][0] is cos and kwargs["position_embeddings"][1] is sin
    # and a value that differs is kept as it is
    from alsparse.capture import BlockCall, _share

    other = BlockCall((), {"position_embeddings": (cos + 1, sin), "flag": True})
    shared = _share(other, calls[0])
    assert shared.kwargs["position_embeddings"][0] is other.kwargs["position_embeddings"][0]
    assert shared.kwargs["position_embeddings"][1] is sin and shared.kwargs["flag"] is True


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_modes_the_umask_gives(tmp_path, calib_ids, umask):
    """The output is staged in a mkdtemp directory (drwx------) and renamed into place: without
    publishing it, a serving process under another user could not read the model."""
    import os
    import stat

    model = make_tiny("llama")
    report = prune_(model, calib_ids, PruneConfig(method="magnitude", sparsity=0.5))
    old = os.umask(umask)
    try:
        out = save(model, None, report, tmp_path / "pruned")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "alsparse_report.json"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_overwrite_survives_a_killed_runs_backup_with_this_pid(calib_ids, tmp_path):
    import os

    model = make_tiny("llama")
    report = prune_(model, calib_ids, PruneConfig(method="magnitude", sparsity=0.5))
    out = save(model, None, report, tmp_path / "pruned")
    stale = tmp_path / f".pruned.old-{os.getpid()}"  # left by a killed run whose pid was this one
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    save(model, None, report, out, overwrite=True)
    assert (out / "config.json").is_file() and not stale.exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear / GPT-2's transposed Conv1D
def test_write_replaces_the_storage_of_a_memory_mapped_weight_and_nothing_else(family, tmp_path):
    """LinearRef.write_ gives the Parameter a fresh storage (no copy-on-write faults in a safetensors
    mapping): the Parameter object stays (hooks, tied names), the written values are a copy (the
    caller's tensor may change afterwards), the file and every other weight are untouched, and
    a wrong shape is refused."""
    make_tiny(family).save_pretrained(tmp_path)  # safetensors: from_pretrained maps it
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path)
    ref = find_linears(decoder_blocks(model)[0])[0]
    param, before = ref.module.weight, {n: p.detach().clone() for n, p in model.named_parameters()}
    mapped = param.data_ptr()
    new = torch.randn_like(ref.weight_oi)
    ref.write_(new)
    assert ref.module.weight is param and torch.equal(ref.weight_oi, new)
    assert param.data_ptr() != mapped, "written into the mapped (copy-on-write) pages"
    new.zero_()
    assert ref.weight_oi.abs().sum() > 0, "the weight aliases the caller's tensor"
    full = f"{'model.layers' if family == 'llama' else 'transformer.h'}.0.{ref.name}.weight"
    for name, p in model.named_parameters():
        if name != full:
            assert torch.equal(p, before[name]), name
    assert torch.equal(dict(fresh.named_parameters())[full], before[full]), "the file was written"
    with pytest.raises(ValueError, match="writing a"):
        ref.write_(torch.zeros(3, 5))


def test_page_out_keeps_every_value():
    """page_out is only a reclaim hint: anonymous and memory-mapped tensors read back unchanged."""
    from alsparse.memory import page_out

    x = torch.randn(1 << 16)
    kept = x.clone()
    page_out(x)
    page_out(x[1:])  # not page aligned: only whole pages inside are hinted
    assert torch.equal(x, kept)
