"""SparseGPT's upper Cholesky factor of H^-1 on this machine: the reference code's path
(cholesky, cholesky_inverse, cholesky again) against ours (a Cholesky of the flipped H and one
triangular solve, pruning/functional.py), on SmolLM2's Hessian sizes, with their agreement; on an
idle machine and again while a second process prunes SmolLM2 with SparseGPT (a sweep next to a
test run, two ranks on one node). Synthetic loads (a matmul loop, a SparseGPT-only loop) did not
show cholesky_inverse's slowdown; the real prune does, though not on every call.

    .venv/bin/python benchmarks/bench_hessian_inverse.py [--json benchmarks/results/hessian_inverse.json]

Per size and condition: the median and the maximum of --repeats calls after one warm-up, in one
process; start it on an idle machine (the JSON records the load average at start and the threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from alsparse.pruning.functional import _inverse_cholesky_upper


def reference(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The SparseGPT reference code's sequence, for comparison only."""
    damped = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def _times(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _measure(sizes: list[int], repeats: int, busy: bool) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for n in sizes:
        x = torch.randn(4 * n, n)
        H = x.T @ x
        ref, ours = reference(H), _inverse_cholesky_upper(H, 0.01)
        t_ref, t_ours = _times(lambda: reference(H), repeats), _times(lambda: _inverse_cholesky_upper(H, 0.01), repeats)
        row = {"n": n, "busy": busy, "reference_median_s": statistics.median(t_ref), "reference_max_s": max(t_ref),
               "ours_median_s": statistics.median(t_ours), "ours_max_s": max(t_ours),
               "max_rel_diff": float((ours - ref).abs().max() / ref.abs().max())}
        rows.append(row)
        print(f"n={n:5d}  {'busy' if busy else 'idle'}  reference median {row['reference_median_s']:.4f} s "
              f"(max {row['reference_max_s']:.4f})  ours median {row['ours_median_s']:.4f} s "
              f"(max {row['ours_max_s']:.4f})  max rel diff {row['max_rel_diff']:.1e}", flush=True)
    return rows


def _start_prune(out: str) -> subprocess.Popen:
    """A real SparseGPT prune of the embedded SmolLM2 as the competing load; returns once it prunes."""
    cmd = [sys.executable, "-m", "alsparse", "prune", "smollm2-135m", "--method", "sparsegpt", "--sparsity", "0.6",
           "--nsamples", "16", "--no-checkpoint", "--overwrite", "--out", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "sparsegpt pruning" not in seen:
        chunk = proc.stderr.read(256)
        if not chunk:
            raise RuntimeError(f"the competing prune ended early: {seen[-2000:]}")
        seen = (seen + chunk)[-4000:]
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="576,1536", help="Hessian sizes (SmolLM2: hidden 576, MLP 1536)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    load_at_start = os.getloadavg()[0]
    rows = _measure(sizes, args.repeats, busy=False)
    with tempfile.TemporaryDirectory() as tmp:
        hog = _start_prune(os.path.join(tmp, "pruned"))
        try:
            rows += _measure(sizes, args.repeats, busy=True)
        finally:
            hog.kill()
            hog.wait()
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "cores": os.cpu_count(), "load_1m_at_start": load_at_start, "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
