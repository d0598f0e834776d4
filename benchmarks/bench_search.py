"""What the searched allocation costs against a uniform prune of the same pruner, in one run on this
machine (issue #18: <= 10x at the default budget): per pruner, a uniform prune, then
``--allocation search`` with each ``--search-final`` (sequential: pruned again; assembled: taken from
the level database), each its own process. Records wall and CPU time, peak RSS, the search's seconds
per phase (pass 1, level database, warm starts, evolution, confirmation), the share of block forwards
the prefix reuse ran, the held-out calibration NLL of the final model both ways, and with ``--eval``
token-ppl (first 40 windows of 1024, WikiText-2 test) of every saved model.

    .venv/bin/python benchmarks/bench_search.py --json benchmarks/results/search_cost_<machine>.json

About 15 minutes per search run and 2 per uniform one with bf16 compute on a 2-vCPU AVX-512-BF16 EPYC
(plus ~1.5 per evaluation). Start it on an idle machine; the load average is recorded before and
after. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from bench_compute_dtype import _cpu_model, _run  # the same process runner and CPU name (benchmarks/ is on sys.path)


def prune(method: str, allocation: str, final: str | None, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "alsparse", "prune", args.model, "--method", method, "--allocation", allocation,
           "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--compute-dtype", args.compute_dtype, "--out", str(out), "--overwrite",
           "--no-checkpoint"]
    if final is not None:
        cmd += ["--search-final", final]
    proc, wall, cpu = _run(cmd)
    summary = json.JSONDecoder().raw_decode(proc.stdout.lstrip())[0]  # the JSON summary comes first
    row = {"method": method, "allocation": allocation, "final": final, "compute_dtype": summary["compute_dtype"],
           "process_wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1),
           "pruning_s": round(sum(summary["timings_s"].values()), 1), "stages_s": summary["timings_s"],
           "peak_rss_gib": summary["peak_memory"].get("peak_rss_gib"),
           "achieved_sparsity": summary["achieved_sparsity"]}
    if allocation == "search":
        report = json.loads((out / "alsparse_report.json").read_text())
        record = report["allocation"]["diagnostics"]["search"]
        row["search"] = {key: record.get(key) for key in (
            "start", "start_fitness", "final_fitness", "generations", "window_forwards", "evolution_block_fraction",
            "confirm", "assembled_heldout_fitness", "final_heldout_nll", "seconds")}
        row["final"] = record.get("final")  # the way the engine made it (auto resolved per pruner)
    if args.eval:
        row["ppl"] = evaluate(str(out), args)
    return row


def evaluate(model: str, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.json"
        _run([sys.executable, "-m", "alsparse", "eval", model, "--ppl", "wikitext2", "--seq-len", "1024",
              "--limit", "40", "--compute-dtype", args.compute_dtype, "--json", str(path)])
        return json.loads(path.read_text())["token_ppl"]["wikitext2"]["ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--finals", default="sequential,assembled")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--eval", action="store_true", help="token-ppl of every saved model (WikiText-2 test, 40 windows)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    out = {"machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_start": list(os.getloadavg())},
           "work": {"model": args.model, "sparsity": args.sparsity, "calibration": f"{args.nsamples} x {args.seq_len}",
                    "seed": args.seed, "compute_dtype": args.compute_dtype},
           "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            uniform = prune(method, "uniform", None, Path(tmp) / f"{method}-uniform", args)
            out["runs"].append(uniform)
            _write(out, args)
            for final in args.finals.split(","):
                row = prune(method, "search", final, Path(tmp) / f"{method}-search-{final}", args)
                row["x_uniform_wall"] = round(row["process_wall_s"] / uniform["process_wall_s"], 2)
                row["x_uniform_pruning"] = round(row["pruning_s"] / uniform["pruning_s"], 2)
                out["runs"].append(row)
                print(json.dumps(row), file=sys.stderr)
                _write(out, args)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    _write(out, args)
    print(json.dumps(out, indent=2))


def _write(out: dict, args) -> None:
    if args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
