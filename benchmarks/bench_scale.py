"""Scaling benchmark on SmolLM2-135M: data-parallel processes (torchrun, gloo) against one process,
and streaming from disk against the in-memory path. Each configuration is a separate process;
ratios are against the first row within this one invocation; the machine is recorded.

    python benchmarks/bench_scale.py --method wanda --out benchmarks/results/scale_smollm2.json

Rows: 1 process (default threads) | 1 process, 1 thread | 2 processes x 1 thread |
1 process --from-disk. Not a test: nothing here asserts.
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

ROWS = [
    ("1 process", 1, None, []),
    ("1 process, OMP_NUM_THREADS=1", 1, "1", []),
    ("2 processes (torchrun, gloo), 1 thread each", 2, "1", []),
    ("1 process, --from-disk", 1, None, ["--from-disk"]),
]


def run(label, nproc, threads, extra, args, workdir: Path) -> dict:
    out = workdir / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    prune = ["prune", args.model, "--method", args.method, "--sparsity", "0.5", "--nsamples", str(args.nsamples),
             "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--out", str(out), *extra]
    launcher = [sys.executable, "-m", "alsparse"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "alsparse"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    start = time.perf_counter()
    proc = subprocess.run([*launcher, *prune], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    return {"label": label, "processes": nproc, "omp_threads": threads or "default",
            "process_wall_s": round(wall, 1), "pruning_s": round(sum(summary["timings_s"].values()), 1),
            "stages_s": summary["timings_s"], "peak_rss_gib_rank0": summary["peak_memory"]["peak_rss_gib"],
            "mask_sha256": [r for r in json.loads((out / "alsparse_report.json").read_text())["linears"]][0][
                "mask_sha256"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="wanda")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rows", default="0,1,2,3", help="which ROWS to run (indices), first = baseline")
    p.add_argument("--out", type=Path, help="write the results as JSON (and a Markdown table beside it)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in (int(x) for x in args.rows.split(",")):
            rows.append(run(*ROWS[i], args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["pruning_s"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["pruning_s"], 3)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    result = {"machine": machine, "method": args.method, "calibration": f"{args.nsamples} x {args.seqlen}",
              "batch_size": args.batch_size, "rows": rows}
    lines = [f"# Scaling on {args.model}: {args.method} 50%, calibration {args.nsamples} x {args.seqlen}, "
             f"micro-batch {args.batch_size}", "", f"machine: {machine}", "",
             "| configuration | pruning s | speedup | process wall s | peak RSS GiB (rank 0) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['pruning_s']} | {r['speedup_vs_first']}x | {r['process_wall_s']} | "
                     f"{r['peak_rss_gib_rank0']} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
