"""alsparse against llm-compressor (the maintained peer, PyPI ``llmcompressor``) on the same work, in one
run on this machine: SmolLM2-135M, Wanda and SparseGPT at 50% unstructured and 2:4, and Wanda + OWL at
70%, from the *same* 32 x 1024 calibration token windows (handed to the peer as a dataset of
input_ids; the windows it actually ran are fingerprinted and must equal ours, or the script stops).

Each prune is its own process, measured from outside with wait4: wall time, CPU time (user + sys), peak
RSS (all of it: load, prune and save). Every saved model is then evaluated by the same evaluator
(``alsparse eval``: token-ppl, first 40 windows of 1024 of WikiText-2 test) and its achieved sparsity
counted from the saved safetensors (the decoder blocks' linears). alsparse runs in fp32 compute (the
peer's precision on CPU) and, for the unstructured rows, also in bf16 compute (``--compute-dtype
bfloat16``, its default where the CPU has fast bf16).

The peer pins transformers <= 5.17, so it gets its own virtual environment, created by this script
when missing (``python -m venv`` + ``pip install torch==2.13.0 llmcompressor==0.14.0``):

    .venv/bin/python benchmarks/bench_llmcompressor.py --json benchmarks/results/llmcompressor_<machine>.json

Start it on an idle machine (the load average is recorded before and after). Not a test: nothing here
asserts, but a calibration mismatch stops it.
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

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
WORKER = HERE / "llmcompressor_worker.py"
PEER_PINS = ["torch==2.13.0", "llmcompressor==0.14.0"]
# (method, pattern, sparsity, allocation): the work both tools do
DEFAULT_JOBS = "wanda:unstructured:0.5,sparsegpt:unstructured:0.5,wanda:2:4,sparsegpt:2:4,wanda:unstructured:0.7:owl"


def parse_jobs(text: str) -> list[dict]:
    jobs = []
    for item in text.split(","):
        parts = item.split(":")
        method, rest = parts[0], parts[1:]
        if rest[0] == "unstructured":
            pattern, rest = "unstructured", rest[1:]
            sparsity = float(rest[0])
            rest = rest[1:]
        else:  # N:M
            pattern, rest = f"{rest[0]}:{rest[1]}", rest[2:]
            sparsity = int(pattern.split(":")[0]) / int(pattern.split(":")[1])
        jobs.append({"method": method, "pattern": pattern, "sparsity": sparsity,
                     "allocation": rest[0] if rest else "uniform"})
    return jobs


def ensure_peer(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return python
    print(f"setting up the peer's venv in {venv} ({' '.join(PEER_PINS)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PINS], check=True)
    return python


def measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run cmd to completion; its own wall, CPU (user + sys) and peak RSS via wait4."""
    with open(log, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}  # ru_maxrss: KiB on Linux


def sorted_fingerprint(windows: torch.Tensor) -> str:
    sys.path.insert(0, str(HERE))
    from llmcompressor_worker import sorted_fingerprint as fp  # one definition for both sides

    return fp(windows)


def achieved(model_dir: Path) -> float:
    zeros = total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, w in load_file(str(f)).items():
            if ".layers." in name and name.endswith(".weight") and w.ndim == 2:
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / total


def evaluate(model_dir: Path, args, work: Path) -> dict:
    out = work / f"{model_dir.name}.eval.json"
    cmd = [sys.executable, "-m", "alsparse", "eval", str(model_dir), "--ppl", "wikitext2", "--seq-len", "1024",
           "--limit", str(args.windows), "--compute-dtype", args.eval_compute_dtype, "--json", str(out)]
    measured(cmd, work / f"{model_dir.name}.eval.log")
    return {"ppl": json.loads(out.read_text())["token_ppl"]["wikitext2"]["ppl"]}


def run_alsparse(job: dict, compute_dtype: str, args, work: Path) -> dict:
    out = work / f"alsparse-{job['method']}-{job['pattern'].replace(':', '_')}-{job['allocation']}-{compute_dtype}"
    cmd = [sys.executable, "-m", "alsparse", "prune", args.model, "--method", job["method"],
           "--allocation", job["allocation"], "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--compute-dtype", compute_dtype, "--out", str(out), "--overwrite",
           "--no-checkpoint"]
    cmd += ["--pattern", job["pattern"]] if job["pattern"] != "unstructured" else ["--sparsity", str(job["sparsity"])]
    row = {"tool": "alsparse", "compute_dtype": compute_dtype, **measured(cmd, out.with_suffix(".log"))}
    report = json.loads((out / "alsparse_report.json").read_text()) if (out / "alsparse_report.json").exists() else None
    if report is None:
        report = json.loads(next(out.glob("*report*.json")).read_text())
    row["calibration_fingerprint"] = report["calibration"]["fingerprint"]
    row["achieved_sparsity"] = achieved(out)
    row.update(evaluate(out, args, work))
    return row


def run_peer(job: dict, python: Path, model_dir: Path, windows_file: Path, args, work: Path) -> dict:
    out = work / f"llmcompressor-{job['method']}-{job['pattern'].replace(':', '_')}-{job['allocation']}"
    spec = {"model": str(model_dir), "windows": str(windows_file), "method": job["method"],
            "sparsity": job["sparsity"], "pattern": job["pattern"], "out": str(out),
            "owl": {"m": args.owl_m, "lambda": args.owl_lambda} if job["allocation"] == "owl" else None,
            "result": str(out) + ".result.json"}
    if job["allocation"] not in ("uniform", "owl"):
        return {"tool": "llmcompressor", "runs": False, "why": f"no {job['allocation']} allocation in the peer"}
    spec_file = Path(str(out) + ".spec.json")
    spec_file.write_text(json.dumps(spec))
    try:
        row = {"tool": "llmcompressor", "compute_dtype": "float32", **measured([str(python), str(WORKER), str(spec_file)],
                                                                              Path(str(out) + ".log"))}
    except SystemExit as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {"tool": "llmcompressor", "runs": False, "why": lines[-1].strip() if lines else str(exc),
                "trace_tail": lines[-12:]}
    result = json.loads(Path(spec["result"]).read_text())
    row.update(runs=True, oneshot_s=result["oneshot_s"], windows_run=result["distinct_windows"],
               calibration_fingerprint_sorted=result["fingerprint_sorted"], versions=result["versions"])
    row["achieved_sparsity"] = achieved(out)
    row.update(evaluate(out, args, work))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--jobs", default=DEFAULT_JOBS,
                   help="method:unstructured:SPARSITY[:allocation] or method:N:M[:allocation], comma-separated")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of 1024 (WikiText-2 test)")
    p.add_argument("--eval-compute-dtype", default="bfloat16",
                   help="compute dtype of every evaluation (the same for all rows; bf16 moved dense ppl 0.04%%)")
    p.add_argument("--bf16-rows", default="unstructured", choices=["unstructured", "all", "none"],
                   help="which jobs alsparse also runs with --compute-dtype bfloat16")
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--peer-venv", default=str(HERE.parent / "out" / "llmcompressor-venv"))
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from alsparse import sources
    from alsparse.data.calibration import fingerprint, load_calibration

    python = ensure_peer(Path(args.peer_venv))
    model_dir = Path(sources.resolve(args.model))
    windows = load_calibration(AutoTokenizer.from_pretrained(model_dir), args.nsamples, args.seq_len, args.seed)
    ours_sorted = sorted_fingerprint(windows)
    out = {"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                       "load_1m_start": os.getloadavg()[0]},
           "calibration": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                           "fingerprint": fingerprint(windows), "fingerprint_sorted": ours_sorted},
           "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-llmc-") as tmp:
        work = Path(tmp)
        windows_file = work / "windows.pt"
        torch.save(windows, windows_file)
        for job in parse_jobs(args.jobs):
            dtypes = ["float32"]
            if args.bf16_rows == "all" or (args.bf16_rows == "unstructured" and job["pattern"] == "unstructured"):
                dtypes.append("bfloat16")
            rows = []
            for dtype in dtypes:
                row = run_alsparse(job, dtype, args, work)
                if row["calibration_fingerprint"] != out["calibration"]["fingerprint"]:
                    raise SystemExit(f"alsparse calibrated on {row['calibration_fingerprint']}, expected "
                                     f"{out['calibration']['fingerprint']}")
                rows.append(row)
            peer = run_peer(job, python, model_dir, windows_file, args, work)
            if peer.get("runs") and peer["calibration_fingerprint_sorted"] != ours_sorted:
                raise SystemExit(f"the peer ran windows {peer['calibration_fingerprint_sorted']}, ours are {ours_sorted}")
            rows.append(peer)
            for row in rows:
                out["rows"].append({**job, **row})
                if peer.get("runs") and row is not peer:
                    row_out = out["rows"][-1]
                    row_out["wall_vs_peer"] = round(row["wall_s"] / peer["wall_s"], 3)
                    row_out["cpu_vs_peer"] = round(row["cpu_s"] / peer["cpu_s"], 3)
                    row_out["rss_vs_peer"] = round(row["peak_rss_gib"] / peer["peak_rss_gib"], 3)
                    row_out["ppl_vs_peer"] = round(row["ppl"] / peer["ppl"], 4)
            out["machine"]["load_1m_end"] = os.getloadavg()[0]
            _write(out, args)
            print(json.dumps(out["rows"][-len(rows):], indent=1), file=sys.stderr)
    print(table(out))


def table(out: dict) -> str:
    lines = ["| work | tool | compute | wall s | CPU s | peak RSS GiB | achieved | token-ppl | wall / peer | ppl / peer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        shape = r["pattern"] if r["pattern"] != "unstructured" else f"{r['sparsity']:.0%}"
        work = f"{r['method']} {shape}"
        work += f" {r['allocation']}" if r["allocation"] != "uniform" else ""
        if r.get("runs") is False:
            lines.append(f"| {work} | {r['tool']} | - | did not run: `{r['why'][:160]}` |||||||")
            continue
        lines.append(f"| {work} | {r['tool']} | {r['compute_dtype']} | {r['wall_s']} | {r['cpu_s']} | "
                     f"{r['peak_rss_gib']} | {r['achieved_sparsity']:.4%} | {r['ppl']:.2f} | "
                     f"{r.get('wall_vs_peer', 1.0 if r['tool'] != 'alsparse' else '-')} | "
                     f"{r.get('ppl_vs_peer', 1.0 if r['tool'] != 'alsparse' else '-')} |")
    return "\n".join(lines)


def _write(out: dict, args) -> None:
    if args.json:
        settings = vars(args)
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
