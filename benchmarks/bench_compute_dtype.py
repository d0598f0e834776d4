"""fp32 against bf16 compute (--compute-dtype) on SmolLM2-135M, in one run on this machine: each
pruner at 50% from 32 x 1024 calibration windows pruned twice, its wall/CPU time, peak RSS, the
masks' agreement between the two, and token-ppl (first 40 windows of 1024, WikiText-2 test) of each
saved model evaluated in fp32 (so the figure isolates the prune); then the dense model evaluated
in each compute dtype (tokens/s and ppl). Each prune and each evaluation is its own process.

    .venv/bin/python benchmarks/bench_compute_dtype.py --json benchmarks/results/compute_dtype_<machine>.json

Also the matmul work each prune does (prune_flops) over its time, against this machine's peak for
one block-sized matmul in that dtype (matmul_peak). Records the CPU, its bf16 flags, what --compute-dtype auto resolves to, and the load average before
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

DEFAULT_METHODS = "wanda:uniform,sparsegpt:uniform,magnitude:uniform,wanda:als"


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
            "eval_s": result["speed"]["token_ppl:wikitext2"]["seconds"],
            "tokens_per_s": result["speed"]["token_ppl:wikitext2"]["tokens_per_s"],
            "process_wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1)}


def matmul_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOPS of a [4096 x 576] @ [576 x 1536] product (SmolLM2's up_proj on 4 windows) in ``dtype``,
    through F.linear as the blocks call it; the best of ``repeats``."""
    x, w = torch.randn(4096, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 576 * 1536 / best / 1e9


def prune_flops(method: str, args) -> float:
    """The matmul work of a prune of SmolLM2-135M (30 blocks, hidden 576, MLP 1536, 9 heads of 64,
    3 KV heads): two block forwards per calibration token (statistics, then the pruned block's
    outputs for the next block), each 2 x 3.54 M weights + attention 2 x 2 x 576 x seq_len; SparseGPT
    adds its Hessians (2 x (3 x 576^2 + 1536^2) per token per block) and the OBS updates."""
    tokens, seq = args.nsamples * args.seq_len, args.seq_len
    linear = 2 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)
    attention = 2 * 2 * 576 * seq
    flops = 30 * tokens * 2 * (linear + attention)
    if method == "sparsegpt":
        flops += 30 * tokens * 2 * (3 * 576**2 + 1536**2)
        shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
        flops += 30 * sum(2 * o * i * i for o, i in shapes)
    return float(flops)


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
    machine["matmul_peak_gflops"] = {d: round(matmul_peak(getattr(torch, d)), 1) for d in dtypes}
    print(json.dumps(machine), file=sys.stderr, flush=True)
    out: dict = {"machine": machine, "prunes": [], "dense_eval": [], "complete": False}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for spec in args.methods.split(","):
            method, allocation = spec.split(":")
            rows = []
            for dtype in dtypes:
                saved = Path(tmp) / f"{method}-{allocation}-{dtype}"
                row = prune(method, allocation, dtype, saved, args)
                if allocation == "uniform" and method != "magnitude":  # the work prune_flops counts
                    row["matmul_gflops_reached"] = round(prune_flops(method, args) / row["pruning_s"] / 1e9, 1)
                    row["fraction_of_matmul_peak"] = round(row["matmul_gflops_reached"]
                                                           / machine["matmul_peak_gflops"][dtype], 3)
                row["ppl_fp32_eval"] = evaluate(str(saved), "float32", args)["ppl"]
                if rows:
                    row.update(agreement(Path(tmp) / f"{method}-{allocation}-{dtypes[0]}", saved))
                    row["x_baseline_wall"] = round(row["pruning_s"] / rows[0]["pruning_s"], 3)
                    row["ppl_vs_baseline"] = round(row["ppl_fp32_eval"] / rows[0]["ppl_fp32_eval"] - 1, 5)
                rows.append(row)
                out["prunes"].append(row)
                _write(out, args)  # as it goes: a stopped run keeps what it measured
                print(json.dumps(row), file=sys.stderr, flush=True)
        for dtype in dtypes:
            row = evaluate(args.model, dtype, args)
            if out["dense_eval"]:
                row["x_baseline_tokens_per_s"] = round(row["tokens_per_s"] / out["dense_eval"][0]["tokens_per_s"], 3)
                row["ppl_vs_baseline"] = round(row["ppl"] / out["dense_eval"][0]["ppl"] - 1, 5)
            out["dense_eval"].append(row)
            _write(out, args)
            print(json.dumps(row), file=sys.stderr, flush=True)
    machine["loadavg_end"] = os.getloadavg()
    out["complete"] = True
    _write(out, args)
    print(json.dumps(out, indent=2))


def _write(out: dict, args) -> None:
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "tmp"}
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps({**out, "settings": settings}, indent=2) + "\n")
        tmp.replace(args.json)


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
