"""Evaluation throughput on the real SmolLM2-135M: token-ppl tokens/s, and zero-shot items/s
batched vs one at a time (same items, same process). Not a test: nothing asserts.

    python benchmarks/bench_eval.py --windows 5 --items 50
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import alsparse
from alsparse.data.calibration import encode_text
from alsparse.data.tasks import load_task
from alsparse.data.text import load_corpus
from alsparse.eval import score_task, token_perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--task", default="piqa")
    args = p.parse_args()
    model, tokenizer = alsparse.load_model(args.model)
    ids = encode_text(tokenizer, load_corpus("wikitext2", "test"))
    start = time.perf_counter()
    result = token_perplexity(model, ids, 1024, limit=args.windows)
    ppl_s = time.perf_counter() - start
    items = load_task(args.task, limit=args.items)
    timings = {}
    for batch_size in (8, 1):
        start = time.perf_counter()
        score_task(model, tokenizer, items, batch_size=batch_size, task=args.task)
        timings[batch_size] = time.perf_counter() - start
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| what | throughput |\n|---|---|")
    print(f"| token-ppl, {args.windows} x 1024-token windows | {result['tokens'] / ppl_s:.0f} tokens/s "
          f"({ppl_s / args.windows:.2f} s per window) |")
    for batch_size, seconds in timings.items():
        print(f"| {args.task}, {args.items} items, batch {batch_size} | {args.items / seconds:.2f} items/s |")
    print(f"\nbatched / one at a time, per item: {timings[1] / timings[8]:.2f}x faster")


if __name__ == "__main__":
    main()
