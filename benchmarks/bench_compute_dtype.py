"""fp32 against bf16 compute (--compute-dtype) on SmolLM2-135M, in one run on this machine: each
pruner at 50% from 32 x 1024 calibration windows pruned twice, its wall/CPU time, peak RSS, the
masks' agreement between the two, and token-ppl (first 40 windows of 1024, WikiText-2 test) of each
saved model evaluated in fp32 (so the figure isolates the prune); then the dense model evaluated
in each compute dtype (tokens/s and ppl). Each prune and each evaluation is its own process.

    .venv/bin/python benchmarks/bench_compute_dtype.py --json benchmarks/results/compute_dtype.json

Records the CPU, its bf16 flags, what --compute-dtype auto resolves to, and the load average before
and after: start it on an idle machine. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from alsparse import compute

DEFAULT_METHODS = "wanda:uniform,sparsegpt:uniform"


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prune(method: str, allocation: str, dtype: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "alsparse", "prune", args.model, "--method", method, "--allocation", allocation,
           "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
           "--compute-dtype", dtype, "--out", str(out), "--overwrite", "--no-checkpoint"]
    proc, wall, cpu = _run(cmd)
    summary = json.JSONDecoder().raw_decode(proc.stdout.lstrip())[0]  # the JSON summary comes first
    return {"method": method, "allocation": allocation, "compute_dtype": summary["compute_dtype"],
            "process_wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1),
            "pruning_s": round(sum(summary["timings_s"].values()), 1), "stages_s": summary["timings_s"],
            "peak_rss_gib": summary["peak_memory"].get("peak_rss_gib"),
            "achieved_sparsity": summary["achieved_sparsity"]}


def evaluate(model: str, dtype: str, args) -> dict:
    cmd = [sys.executable, "-m", "alsparse", "eval", model, "--ppl", "wikitext2", "--seq-len", "1024",
           "--limit", str(args.windows), "--compute-dtype", dtype, "--json", str(Path(args.tmp) / "eval.json")]
    _, wall, cpu = _run(cmd)
    result = json.loads((Path(args.tmp) / "eval.json").read_text())
    ppl = result["token_ppl"]["wikitext2"]
    return {"compute_dtype": result["compute_dtype"], "ppl": ppl["ppl"], "tokens": ppl["tokens"],
            "process_wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1)}


def agreement(a: Path, b: Path) -> dict:
    """Share of prunable weights whose kept/pruned state is the same in both saved models, and
    whether every saved tensor kept its dtype."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    same = total = 0
    for name, t in wa.items():
        if ".layers." in name and t.ndim == 2:
            same += int(((t == 0) == (wb[name] == 0)).sum())
            total += t.numel()
    return {"mask_agreement": same / total, "saved_dtypes_equal": all(wa[n].dtype == wb[n].dtype for n in wa),
            "saved_dtypes": sorted({str(t.dtype) for t in wb.values()})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="method:allocation,...")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, the first is the baseline")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=40, help="token-ppl windows of 1024 (WikiText-2 test)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    machine = {"cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "torch": torch.__version__,
               "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "bf16_flags": sorted(compute.cpu_flags()), "auto_resolves_to": compute.name(
                   compute.resolve("auto", torch.device("cpu"), torch.float32)),
               "loadavg_start": os.getloadavg()}
    print(json.dumps(machine), file=sys.stderr, flush=True)
    out: dict = {"machine": machine, "settings": vars(args), "prunes": [], "dense_eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for spec in args.methods.split(","):
            method, allocation = spec.split(":")
            rows = []
            for dtype in dtypes:
                saved = Path(tmp) / f"{method}-{allocation}-{dtype}"
                row = prune(method, allocation, dtype, saved, args)
                row["ppl_fp32_eval"] = evaluate(str(saved), "float32", args)["ppl"]
                if rows:
                    row.update(agreement(Path(tmp) / f"{method}-{allocation}-{dtypes[0]}", saved))
                    row["x_baseline_wall"] = round(row["pruning_s"] / rows[0]["pruning_s"], 3)
                    row["ppl_vs_baseline"] = round(row["ppl_fp32_eval"] / rows[0]["ppl_fp32_eval"] - 1, 5)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            out["prunes"].extend(rows)
        for dtype in dtypes:
            row = evaluate(args.model, dtype, args)
            row["tokens_per_s"] = round(row["tokens"] / row["process_wall_s"], 1)
            out["dense_eval"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    machine["loadavg_end"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
