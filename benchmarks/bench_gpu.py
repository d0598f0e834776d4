"""GPU benchmark: pruning time per stage and peak CUDA memory on random-weight models of real shapes,
with the same pruning on the machine's CPU cores as the baseline of the first table. Not a test:
nothing here asserts (tests/gpu holds the CUDA correctness tests).

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu_h200     # writes .json and .md

Random weights and random calibration ids: the time and the memory of pruning depend on the shapes,
the calibration size and the dtype, not on what the weights have learned (the allocations and the
quality of random models mean nothing and are not reported). Rows:

1. SmolLM2-135M's shape, float32, 32 x 1024 calibration, Wanda uniform: CPU (all cores) against
   CUDA in float32 and in bfloat16 -- the speed-up of the same job.
2. TinyLlama-1.1B's shape, bfloat16, 128 x 2048 calibration (the papers' set-up), the model held in
   CPU memory and each block onloaded to the GPU (the CLI's default path): every pruner under uniform
   and ALS, then ``--from-disk`` (blocks read from safetensors shards when used).
3. Two decoder blocks of Llama-2-70B's shape, bfloat16, 128 x 2048, from disk: the time and memory of
   one 70B block, from which a whole 70B model's pruning is extrapolated (x 80 blocks).

Each row resets the CUDA peak-memory counter; rows that fail are recorded with their error and the
run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alsparse.api import prune_  # noqa: E402
from alsparse.checkpoint import BlockCheckpoints  # noqa: E402
from alsparse.config import ALSOptions, PruneConfig  # noqa: E402
from alsparse.lazy import load_lazy  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000),
    "llama2-70b x 2 blocks": (8192, 28672, 2, 64, 8, 32000),
}


def random_llama(shape: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def params_b(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e9, 3)


def run_row(label: str, model, ids, config: PruneConfig, checkpoint=None) -> dict:
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = prune_(model, ids, config, checkpoint=checkpoint)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    row = {"label": label, "device": str(device), "dtype": str(next(iter(model.state_dict().values())).dtype),
           "method": config.method, "allocation": config.allocation, "calibration": list(ids.shape),
           "wall_s": round(wall, 2), "stages_s": {k: round(v, 2) for k, v in report.timings_s.items()},
           "achieved_sparsity": round(report.achieved_sparsity, 4), "blocks": report.num_blocks,
           "peak_rss_gib": report.peak_memory.get("peak_rss_gib")}
    if device.type == "cuda":
        row["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_cuda_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(row), flush=True)
    return row


ON_ROW = [lambda: None]  # main() makes this write the results files, so a run stopped part-way keeps its rows


def guarded(rows: list, label: str, fn) -> None:
    try:
        row = fn()
        if row is not None:  # a table function appends its own rows
            rows.append(row)
    except Exception as exc:  # noqa: BLE001 -- a failed row is a result too
        traceback.print_exc()
        rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
    finally:
        ON_ROW[0]()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ids_for(shape: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    vocab = SHAPES[shape][5]
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def config_for(method: str, allocation: str, device: str, batch_size: int) -> PruneConfig:
    return PruneConfig(method=method, sparsity=0.5, allocation=allocation, device=device, batch_size=batch_size,
                       als=ALSOptions())


def speedup_rows(rows: list, args) -> None:
    """Table 1: the same Wanda job on the CPU cores and on the GPU."""
    ids = ids_for("smollm2-135m", 32, 1024) if not args.dry_run else ids_for("smollm2-135m", 4, 64)
    jobs = [("smollm2 shape fp32, CPU", "cpu", torch.float32)]
    if torch.cuda.is_available():
        jobs += [("smollm2 shape fp32, CUDA", "cuda", torch.float32),
                 ("smollm2 shape bf16, CUDA", "cuda", torch.bfloat16)]
    for label, device, dtype in jobs:
        if args.skip_cpu_baseline and device == "cpu":
            continue
        guarded(rows, label, lambda: run_row(label, random_llama("smollm2-135m", dtype), ids,
                                             config_for("wanda", "uniform", device, 4)))


def tinyllama_rows(rows: list, args, tmp: Path) -> None:
    """Table 2: a 1.1B model in bf16 with the papers' calibration."""
    shape = "tinyllama-1.1b"
    ids = ids_for(shape, args.nsamples, args.seqlen)
    model = random_llama(shape, torch.bfloat16)
    source = tmp / "tinyllama"
    model.save_pretrained(source, max_shard_size="1GB")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    size = params_b(model)
    for method in ("magnitude", "wanda", "sparsegpt"):
        for allocation in ("uniform", "als"):
            label = f"1.1B bf16 {method} {allocation}"
            model.load_state_dict(state)  # dense again
            guarded(rows, label, lambda: {**run_row(label, model, ids, config_for(method, allocation, args.device, 8)),
                                          "params_b": size})
    del model, state
    gc.collect()
    from_disk_rows(rows, args, tmp, source, "1.1B bf16", ids, size)


def from_disk_rows(rows: list, args, tmp: Path, source: Path, name: str, ids, size: float) -> None:
    """Wanda and SparseGPT under ALS, the blocks streamed from ``source`` onto the device."""
    for method in ("wanda", "sparsegpt"):
        label = f"{name} {method} als, from disk"
        guarded(rows, label, lambda: {**run_row(label, load_lazy(source, torch.bfloat16), ids,
                                                config_for(method, "als", args.device, 8),
                                                checkpoint=BlockCheckpoints(tmp / f"ckpt-{source.name}-{method}")),
                                      "params_b": size})


def llama70_rows(rows: list, args, tmp: Path) -> None:
    """Table 3: two blocks of Llama-2-70B's shape, from disk."""
    shape = "llama2-70b x 2 blocks"
    model = random_llama(shape, torch.bfloat16)
    source = tmp / "llama70-2"
    model.save_pretrained(source, max_shard_size="2GB")
    size = params_b(model)
    del model
    gc.collect()
    from_disk_rows(rows, args, tmp, source, "70B-shape 2 blocks bf16", ids_for(shape, args.nsamples, args.seqlen), size)


def markdown(result: dict) -> str:
    lines = [f"# GPU pruning benchmark ({result['gpu']})", "", f"machine: {result['machine']}", "",
             "Random weights of the named shapes; calibration ids random. Times are wall seconds of `prune_` "
             "(CUDA synchronised); peak CUDA memory is reset before each row; peak RSS is the process's "
             "high-water mark so far (it only grows down the table).", "",
             "| row | device | calibration | wall s | capture/pass1/alloc/prune s | peak CUDA GiB | peak RSS GiB | "
             "sparsity |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        s = r["stages_s"]
        stages = "/".join(str(s.get(k, 0)) for k in ("capture", "pass1", "allocation", "prune"))
        cal = "x".join(str(x) for x in r["calibration"])
        lines.append(f"| {r['label']} | {r['device']} {r['dtype'].replace('torch.', '')} | {cal} | {r['wall_s']} | "
                     f"{stages} | {r.get('peak_cuda_gib', '')} | {r['peak_rss_gib']} | {r['achieved_sparsity']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.json and STEM.md")
    p.add_argument("--tables", default="1,2,3", help="which tables to run")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--skip-cpu-baseline", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes and calibration on whatever device there is: checks the script, measures nothing")
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run:
        for name, shape in SHAPES.items():
            SHAPES[name] = (64, 128, min(shape[2], 2), 4, 2, 512)  # hidden, MLP, layers (at most 2), heads, kv, vocab
        args.nsamples, args.seqlen = 4, 64
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads()}
    result = {"gpu": gpu, "machine": machine, "rows": []}
    tables = {int(t) for t in args.tables.split(",")}

    def flush() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))

    ON_ROW[0] = flush
    with tempfile.TemporaryDirectory() as tmp:
        if 1 in tables:
            speedup_rows(result["rows"], args)
        if 2 in tables:
            guarded(result["rows"], "table 2", lambda: tinyllama_rows(result["rows"], args, Path(tmp)))
        if 3 in tables:
            guarded(result["rows"], "table 3", lambda: llama70_rows(result["rows"], args, Path(tmp)))
    print(markdown(result))


if __name__ == "__main__":
    main()
