"""How the Redundancy Metric's cost grows with units L, kept tokens m and hidden size d.

Synthetic features, the library's own FeatureSummary + redundancy_matrix, one process, wall time
per configuration (median of 3). Ratios are against the first row. Not a test: nothing asserts.

    python benchmarks/bench_rm.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

from alsparse.redundancy.metric import redundancy_matrix
from alsparse.redundancy.summary import FeatureSummary, select_tokens

GRID = [  # (units L, tokens m, hidden d)
    (30, 1024, 576), (60, 1024, 576), (120, 1024, 576),  # units
    (30, 2048, 576), (30, 4096, 576),  # tokens
    (30, 1024, 1152), (30, 1024, 2304), (30, 1024, 4608),  # hidden (4608 > m: Gram storage)
]


def one(units: int, m: int, d: int) -> tuple[float, float, int]:
    index = select_tokens(m, None, 0)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(m, d, generator=gen)
    start = time.perf_counter()
    summaries = []
    for _ in range(units):
        s = FeatureSummary(index)
        s.update(base + 0.5 * torch.randn(m, d, generator=gen), 0)
        s.finalize()
        summaries.append(s)
    build = time.perf_counter() - start
    start = time.perf_counter()
    redundancy_matrix(summaries)
    metric = time.perf_counter() - start
    stored = sum(s.matrix.numel() * s.matrix.element_size() for s in summaries)
    return build, metric, stored


def main() -> None:
    rows = []
    for units, m, d in GRID:
        runs = [one(units, m, d) for _ in range(3)]
        build = statistics.median(r[0] for r in runs)
        metric = statistics.median(r[1] for r in runs)
        rows.append({"units": units, "tokens": m, "hidden": d, "summaries_s": round(build, 3),
                     "rm_matrix_s": round(metric, 3), "summary_mib": round(runs[0][2] / 2**20, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]["rm_matrix_s"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| units L | tokens m | hidden d | build summaries s | RM matrix s | x first | summaries MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['units']} | {r['tokens']} | {r['hidden']} | {r['summaries_s']} | {r['rm_matrix_s']} "
              f"| {r['rm_matrix_s'] / base:.1f} | {r['summary_mib']} |")


if __name__ == "__main__":
    main()
