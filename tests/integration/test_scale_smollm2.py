"""The real SmolLM2-135M streamed from disk (under a 1 GiB memory cap that the in-memory path
fails, peak memory measured in a subprocess) and pruned by two data-parallel processes under
torchrun: same result as the in-memory, single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

_MEASURED = textwrap.dedent("""
    import json, sys
    from alsparse.cli import main
    from alsparse.report import peak_rss_gib
    code = main(sys.argv[2:])
    peak = peak_rss_gib()  # this process image's own peak, whatever the parent's
    open(sys.argv[1], "w").write(json.dumps({"code": code, "peak_rss_gib": peak}))
""")


def _args(model_dir, out, *extra):
    # float32 compute: these tests compare two paths bit for bit (bf16 rounding would widen the gap)
    return ["prune", str(model_dir), "--calib", "wikitext2", "--nsamples", "8", "--seqlen", "256",
            "--batch-size", "2", "--method", "wanda", "--sparsity", "0.5", "--compute-dtype", "float32",
            "--out", str(out), *extra]


CAP_GIB = 1.0  # RLIMIT_DATA: the process's private writable memory (heap and anonymous maps)


def _capped():
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (int(CAP_GIB * 2**30), int(CAP_GIB * 2**30)))


def _measured(tmp_path, name, args, cap=False):
    record = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", _MEASURED, str(record), *args], capture_output=True, text=True,
                          timeout=900, preexec_fn=_capped if cap else None)
    if not record.is_file():
        return None  # killed by the cap
    result = json.loads(record.read_text())
    assert result["code"] == 0, proc.stderr[-3000:]
    return result["peak_rss_gib"]


def _weights(directory):
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_smollm2_from_disk_is_identical_in_far_less_memory(real_model_dir, tmp_path):
    fp32_gib = sum(t.numel() * 4 for t in _weights(real_model_dir).values()) / 2**30  # 0.50 GiB
    in_ram = _measured(tmp_path, "ram", _args(real_model_dir, tmp_path / "ram"))
    from_disk = _measured(tmp_path, "disk", _args(real_model_dir, tmp_path / "disk", "--from-disk"), cap=True)
    assert from_disk is not None, f"--from-disk did not finish under a {CAP_GIB} GiB cap"
    print(f"peak RSS: in memory {in_ram:.3f} GiB, from disk {from_disk:.3f} GiB under a {CAP_GIB} GiB data cap "
          f"(fp32 weights {fp32_gib:.3f} GiB)")
    capped = subprocess.run([sys.executable, "-m", "alsparse", *_args(real_model_dir, tmp_path / "ram-capped")],
                            capture_output=True, text=True, timeout=900, preexec_fn=_capped)
    assert capped.returncode != 0 and not (tmp_path / "ram-capped").exists(), "the cap is one the in-memory path fails"
    # measured on the 2-core CI machine: in memory 1.03-1.06 GiB, from disk 0.57-0.77 GiB (the spread is the
    # allocator's, with other processes running); python + torch + transformers + tokenizer are ~0.45 GiB of it
    assert from_disk < in_ram - 0.2, "streaming must save a large part of the weights' memory"
    a, b = _weights(tmp_path / "ram"), _weights(tmp_path / "disk")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("extra", [
    # the default run keeps the case that exercises the most (pass 1, the strength search and the
    # prune, all under torchrun); the pruner-only cases repeat tests/plumbing/test_distributed.py on
    # the real model and take 4 minutes between them: slow tier
    pytest.param(["--method", "wanda"], marks=pytest.mark.slow, id="wanda"),
    pytest.param(["--method", "sparsegpt"], marks=pytest.mark.slow, id="sparsegpt"),
    pytest.param(["--method", "wanda", "--allocation", "als"], id="wanda-als"),
])
def test_smollm2_two_processes_equal_one(real_model_dir, tmp_path, extra):
    # one thread per process in both runs, so every micro-batch is computed by the same kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["prune", str(real_model_dir), "--calib", "wikitext2", "--nsamples", "4", "--seqlen", "128",
              "--batch-size", "1", "--sparsity", "0.5", "--compute-dtype", "float32", *extra]
    one = subprocess.run([sys.executable, "-m", "alsparse", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "alsparse", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "alsparse_report.json").read_text()) for d in ("one", "two")]
    assert reports[0]["allocation"]["sparsity"] == reports[1]["allocation"]["sparsity"]
    assert [r["mask_sha256"] for r in reports[0]["linears"]] == [r["mask_sha256"] for r in reports[1]["linears"]]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        assert torch.equal(a[name], b[name]), name
