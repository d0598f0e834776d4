"""Data-parallel pruning under torchrun (gloo, CPU): two processes give the masks and weights of
one, for Wanda, SparseGPT and ALS/OWL allocation; only rank 0 writes.

The condition the README states: the same threads per process. torchrun runs each process with one
thread (OMP_NUM_THREADS=1), so the single process runs with --threads 1: with another thread count
float32 kernels may sum in another order (on some CPUs), and a SparseGPT mask at its threshold can
flip. SparseGPT's updated weights agree to float rounding (its sums are grouped by process);
masks, allocations and Wanda/magnitude weights are bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

CASES = [
    ("wanda", "uniform", []),
    ("sparsegpt", "als", ["--als-tokens", "48"]),
    ("wanda", "owl", []),
    ("magnitude", "als", ["--als-level", "component", "--als-tokens", "48"]),
]


def _prune(root, out, *extra, nproc=1):
    args = ["prune", str(root / "model"), "--calib", str(root / "corpus.txt"), "--nsamples", "8", "--seqlen", "16",
            "--batch-size", "2", "--sparsity", "0.6", "--threads", "1", "--out", str(out), *extra]
    launcher = [sys.executable, "-m", "alsparse"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "alsparse"]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method,allocation,extra", CASES, ids=[f"{m}-{a}" for m, a, _ in CASES])
def test_two_processes_prune_exactly_like_one(tiny_model_dir, tmp_path, method, allocation, extra):
    flags = ["--method", method, "--allocation", allocation, *extra]
    _prune(tiny_model_dir, tmp_path / "one", *flags)
    two = _prune(tiny_model_dir, tmp_path / "two", *flags, nproc=2)
    assert two.stdout.count('"achieved_sparsity"') == 1, "only rank 0 prints the summary"
    one_report, two_report = (json.loads((tmp_path / d / "alsparse_report.json").read_text()) for d in ("one", "two"))
    assert two_report["allocation"]["sparsity"] == one_report["allocation"]["sparsity"]
    assert [r["mask_sha256"] for r in two_report["linears"]] == [r["mask_sha256"] for r in one_report["linears"]]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in a:  # kept weights: equal, up to SparseGPT's updates computed with other thread counts
        assert torch.equal(a[name] == 0, b[name] == 0), name
        if method == "sparsegpt":
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(a[name], b[name]), name


def test_more_processes_than_micro_batches_is_a_clear_error(tiny_model_dir, tmp_path):
    args = ["prune", str(tiny_model_dir / "model"), "--calib", str(tiny_model_dir / "corpus.txt"), "--nsamples", "2",
            "--seqlen", "16", "--batch-size", "2", "--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "alsparse", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "1 calibration micro-batches cannot feed 2 processes" in proc.stderr
    assert not (tmp_path / "o").exists()
