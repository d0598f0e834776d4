"""Where a prune's time goes: SmolLM2-135M pruned at 50% from N x 1024 calibration windows under
the torch profiler, the ops sorted by self CPU time (the figures behind docs/PERFORMANCE.md's
"Where the time goes"). Wrap it in ``/usr/bin/time -v`` for system time and page faults.

    .venv/bin/python benchmarks/profile_prune.py --method wanda --compute-dtype bfloat16 --nsamples 8

Not a test: nothing here asserts. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from alsparse.api import prune_
from alsparse.config import PruneConfig
from alsparse.data.calibration import load_calibration
from alsparse.sources import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="wanda")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--no-profiler", action="store_true", help="only the wall time")
    args = p.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    calibration = load_calibration(tokenizer, nsamples=args.nsamples, seqlen=1024, seed=0)
    config = PruneConfig(method=args.method, sparsity=0.5, compute_dtype=args.compute_dtype)
    start = time.perf_counter()
    if args.no_profiler:
        prune_(model.eval(), calibration, config)
    else:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prune_(model.eval(), calibration, config)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"{args.method} {args.compute_dtype} {args.nsamples} x 1024: prune {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
