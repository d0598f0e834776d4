"""Prune SmolLM2-135M with each pruner (and allocator) and measure wall time, stage times, peak RSS
and token-ppl. Each run is a separate `alsparse prune` process, so peak RSS is that run's alone.

    python benchmarks/bench_prune.py --runs wanda:uniform,sparsegpt:uniform --ppl-windows 40

Ratios are against the first run listed (the baseline) within this one invocation; the machine
is recorded with the results. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RUNS = "wanda:uniform:1,magnitude:uniform,wanda:uniform,sparsegpt:uniform,wanda:als"


def run_one(method: str, allocation: str, batch_size: int, args, workdir: Path) -> dict:
    out = workdir / f"{method}-{allocation}-bs{batch_size}"
    cmd = [sys.executable, "-m", "alsparse", "prune", args.model, "--method", method, "--allocation", allocation,
           "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", str(batch_size), "--out", str(out), "--overwrite"]
    if args.ppl_windows and f"{method}:{allocation}" in args.ppl_for.split(","):
        cmd += ["--eval", "--eval-ppl", "wikitext2", "--eval-limit", str(args.ppl_windows), "--eval-seq-len", "1024"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    stages = summary["timings_s"]
    row = {
        "method": method, "allocation": allocation, "batch_size": batch_size,
        "process_wall_s": round(wall, 1),  # includes model load, save and any evaluation
        "pruning_s": round(sum(stages.values()), 1),  # capture + pass 1 + allocation + pruning
        "stages_s": stages,
        "peak_rss_gib": summary["peak_memory"]["peak_rss_gib"],  # measured in the run, before saving
        "achieved_sparsity": summary["achieved_sparsity"],
    }
    if "eval" in summary:
        row["dense_ppl"] = summary["eval"]["dense"]["token_ppl"]["wikitext2"]["ppl"]
        row["pruned_ppl"] = summary["eval"]["pruned"]["token_ppl"]["wikitext2"]["ppl"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="method:allocation[:batch_size],... (first = baseline)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--ppl-windows", type=int, default=0, help="token-ppl over the first N x 1024 test windows")
    p.add_argument("--ppl-for", default="wanda:uniform,wanda:als", help="method:allocation runs that get the ppl")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs.split(","):
            method, allocation, *bs = spec.split(":")
            rows.append(run_one(method, allocation, int(bs[0]) if bs else 4, args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]["pruning_s"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads default, {platform.platform()}"
    print(f"SmolLM2-135M, {args.sparsity:.0%} target, calibration {args.nsamples} x {args.seqlen}; machine: {machine}\n")
    print("| method | allocation | micro-batch | pruning s | x baseline | capture | pass 1 | prune | peak RSS GiB | ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stages_s"]
        ppl = f"{r['pruned_ppl']:.2f}" if "pruned_ppl" in r else "-"
        print(f"| {r['method']} | {r['allocation']} | {r['batch_size']} | {r['pruning_s']} | {r['pruning_s'] / base:.2f} "
              f"| {st.get('capture', 0):.1f} | {st.get('pass1', 0):.1f} | {st.get('prune', 0):.1f} "
              f"| {r['peak_rss_gib']} | {ppl} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
