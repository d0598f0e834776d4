"""Interruption and resume: per-block checkpoints, a SIGKILLed CLI run resumed bit-identically,
damaged checkpoints redone, foreign checkpoints refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file

from alsparse.api import prune_
from alsparse.checkpoint import BlockCheckpoints, CheckpointMismatchError
from alsparse.config import ALSOptions, PruneConfig

IDS = torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))


class Interrupt(Exception):
    pass


def _stop_after(block):
    def on_block(index, total):
        if index == block:
            raise Interrupt

    return on_block


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _config(method="wanda", allocation="uniform", sparsity=0.5):
    return PruneConfig(method=method, sparsity=sparsity, allocation=allocation, als=ALSOptions(tokens=48))


@pytest.mark.parametrize("method,allocation,family", [
    ("wanda", "uniform", "llama"),
    ("sparsegpt", "als", "opt"),
    ("magnitude", "uniform", "gpt2"),
    ("wanda", "owl", "gemma2"),
])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, method, allocation, family):
    reference = make_tiny(family)
    ref_report = prune_(reference, IDS, _config(method, allocation))

    ckpt = BlockCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        prune_(make_tiny(family), IDS, _config(method, allocation), checkpoint=ckpt, on_block=_stop_after(1))
    assert sorted(p.name for p in ckpt.dir.glob("block-*.safetensors")) == ["block-00000.safetensors",
                                                                           "block-00001.safetensors"]
    seen = []
    resumed = make_tiny(family)
    report = prune_(resumed, IDS, _config(method, allocation), checkpoint=BlockCheckpoints(ckpt.dir), resume=True,
                    on_block=lambda i, n: seen.append(i))
    assert report.resumed_from_block == 2 and seen == [2], "blocks 0 and 1 are restored, never re-pruned"
    assert "pass1" not in report.timings_s, "the saved allocation is reused"
    assert report.allocation["sparsity"] == ref_report.allocation["sparsity"]
    assert [r.mask_sha256 for r in report.linears] == [r.mask_sha256 for r in ref_report.linears]
    expected = _weights(reference)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_damaged_last_checkpoint_is_detected_and_redone(tmp_path, caplog):
    reference = make_tiny("llama")
    prune_(reference, IDS, _config())
    ckpt = BlockCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        prune_(make_tiny("llama"), IDS, _config(), checkpoint=ckpt, on_block=_stop_after(1))
    last = ckpt.dir / "block-00001.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short, as by a full disk
    resumed = make_tiny("llama")
    report = prune_(resumed, IDS, _config(), checkpoint=BlockCheckpoints(ckpt.dir), resume=True)
    assert report.resumed_from_block == 1
    assert "block 1" in caplog.text and "damaged" in caplog.text
    expected = _weights(reference)
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())


def test_foreign_checkpoint_is_refused_and_kept(tmp_path):
    ckpt = BlockCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        prune_(make_tiny("llama"), IDS, _config(), checkpoint=ckpt, on_block=_stop_after(0))
    before = sorted((p.name, p.read_bytes()) for p in ckpt.dir.iterdir())
    with pytest.raises(CheckpointMismatchError, match=r"config\.sparsity \(checkpoint: 0\.5, now: 0\.6\)"):
        prune_(make_tiny("llama"), IDS, _config(sparsity=0.6), checkpoint=BlockCheckpoints(ckpt.dir), resume=True)
    with pytest.raises(CheckpointMismatchError, match="model"):
        prune_(make_tiny("llama", seed=1), IDS, _config(), checkpoint=BlockCheckpoints(ckpt.dir), resume=True)
    with pytest.raises(CheckpointMismatchError, match="calibration"):
        prune_(make_tiny("llama"), IDS[:4], _config(), checkpoint=BlockCheckpoints(ckpt.dir), resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        prune_(make_tiny("llama"), IDS, _config(), checkpoint=BlockCheckpoints(ckpt.dir))
    assert sorted((p.name, p.read_bytes()) for p in ckpt.dir.iterdir()) == before


_KILLABLE = textwrap.dedent("""
    import sys, time
    import alsparse.checkpoint as ck
    save_block, kill_after = ck.BlockCheckpoints.save_block, int(sys.argv[1])

    def paused(self, index, tensors):
        save_block(self, index, tensors)
        if index == kill_after:
            print(f"checkpointed block {index}", flush=True)
            time.sleep(600)  # the test SIGKILLs us here

    ck.BlockCheckpoints.save_block = paused
    from alsparse.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "alsparse", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _prune_args(root, out, *extra):
    return ["prune", str(root / "model"), "--calib", str(root / "corpus.txt"), "--nsamples", "4", "--seqlen", "16",
            "--method", "sparsegpt", "--allocation", "als", "--als-tokens", "32", "--out", str(out), *extra]


@pytest.mark.parametrize("damage", [False, True], ids=["intact", "damaged-last"])
def test_sigkilled_cli_prune_resumes_bit_identically(tiny_model_dir, tmp_path, damage):
    _cli(*_prune_args(tiny_model_dir, tmp_path / "reference"))
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _KILLABLE, "1", *_prune_args(tiny_model_dir, out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "checkpointed block 1"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    ckpt = tmp_path / "out.alsparse-ckpt"
    assert not out.exists() and (ckpt / "block-00001.safetensors").is_file()
    if damage:
        with open(ckpt / "block-00001.safetensors", "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\xff" * 8)

    refused = _cli(*_prune_args(tiny_model_dir, out), check=False)  # forgetting --resume loses nothing
    assert refused.returncode == 2 and "--resume" in refused.stderr and (ckpt / "manifest.json").is_file()
    resumed = _cli(*_prune_args(tiny_model_dir, out, "--resume"))
    assert f"blocks before {1 if damage else 2} came from the checkpoints" in resumed.stderr
    assert not ckpt.exists(), "checkpoints are removed once the model is saved"
    got, want = load_file(out / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
