"""A quick like-for-like comparison of allocators on the real SmolLM2-135M (one process).

    python benchmarks/compare_allocators.py --methods wanda --allocations uniform,als,owl \
        --sparsities 0.5,0.7 --nsamples 8 --ppl-windows 10

Each cell starts from the same dense weights and the same calibration windows (WikiText-2
validation, seed 0); token-ppl on the first N x 1024 windows of WikiText-2 test. This is a smoke
comparison sized for minutes on 2 cores, not the headline protocol of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import alsparse
from alsparse.data.calibration import load_calibration


def als_options(text: str) -> alsparse.ALSOptions:
    """'solver=qp,delta=0.05' -> ALSOptions (numbers parsed as float, 'none' as None)."""
    kwargs = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        try:
            kwargs[key] = None if value == "none" else float(value) if key in ("delta", "granularity", "qp_lambda") else value
        except ValueError:
            raise SystemExit(f"--als {item!r}: {key} needs a number") from None
    return alsparse.ALSOptions(**kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="wanda")
    p.add_argument("--allocations", default="uniform,als,owl")
    p.add_argument("--sparsities", default="0.5,0.7")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--ppl-windows", type=int, default=10)
    p.add_argument("--als", default="", help="ALS options for the 'als' cells, e.g. solver=qp,normalize=standardize")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tokenizer = alsparse.load_model(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = load_calibration(tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    eval_cfg = alsparse.EvalConfig(ppl=("wikitext2",), seq_len=1024, limit=args.ppl_windows)

    def ppl() -> float:
        return alsparse.evaluate(model, tokenizer, eval_cfg)["token_ppl"]["wikitext2"]["ppl"]

    rows = [{"method": "dense", "allocation": "-", "sparsity": 0.0, "ppl": ppl()}]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for method in args.methods.split(","):
        for sparsity in map(float, args.sparsities.split(",")):
            for allocation in args.allocations.split(","):
                model.load_state_dict(dense_state)
                start = time.perf_counter()
                cfg = alsparse.PruneConfig(method=method, sparsity=sparsity, allocation=allocation, batch_size=4,
                                           als=als_options(args.als))
                report = alsparse.prune_(model, calib, cfg)
                rows.append({"method": method, "allocation": allocation, "sparsity": sparsity, "ppl": ppl(),
                             "achieved": report.achieved_sparsity, "prune_s": time.perf_counter() - start,
                             "per_block": [round(s, 3) for s in report.allocation["sparsity"]]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"token-ppl, WikiText-2 test, first {args.ppl_windows} x 1024 windows; calibration "
          f"{args.nsamples} x {args.seqlen} WikiText-2 validation, seed 0; ALS options: {args.als or 'defaults'}\n")
    print("| method | sparsity | " + " | ".join(args.allocations.split(",")) + " |")
    print("|---|---|" + "---|" * len(args.allocations.split(",")))
    print(f"| dense | 0 | {rows[0]['ppl']:.2f} |")
    for method in args.methods.split(","):
        for sparsity in map(float, args.sparsities.split(",")):
            cells = [next(r for r in rows if r["method"] == method and r["sparsity"] == sparsity
                          and r["allocation"] == a)["ppl"] for a in args.allocations.split(",")]
            print(f"| {method} | {sparsity:.0%} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
