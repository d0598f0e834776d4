"""Sequential or assembled final model for a searched allocation, compared fairly on calibration data
(issue #18: "the final model pruned with the found allocation, sequentially, or assembled from the
database if that is equal or better").

A search records two held-out calibration figures: ``assembled_heldout_fitness`` (the model the search
scored, from the level database, pruned on the fit windows only) and ``final_heldout_nll`` (the final
model; with ``final=sequential`` pruned on *all* calibration windows, the held-out ones included, so
the figure is biased in its favour). This probe removes the bias: for each searched cell of a sweep's
results it prunes the dense model sequentially with the cell's found allocation on the *fit* windows
only and scores the held-out windows, so the two ways are compared on windows neither has seen.

    .venv/bin/python benchmarks/probe_search_final.py benchmarks/results/sweep_smollm2_search.jsonl \
        --json benchmarks/results/search_final_probe.json [--method sparsegpt]

One sequential prune per cell (~1-2.5 min with bf16 compute on 2 vCPUs). Not a test: nothing asserts.
Evaluation text is never read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def _config(record: dict, allocation_file: str):
    from alsparse.config import ALSOptions, BaselineOptions, PruneConfig, SearchOptions

    raw = dict(record["prune_config"])  # the options as the cell ran, with the found allocation from a file
    als, baselines, search = raw.pop("als"), raw.pop("baselines"), raw.pop("search")
    raw.update(allocation="file", allocation_file=allocation_file)
    return PruneConfig(**raw, als=ALSOptions(**als), baselines=BaselineOptions(**baselines),
                       search=SearchOptions(**search))


def probe(record: dict, models: dict) -> dict:
    import copy

    from alsparse import compute
    from alsparse.api import prune_
    from alsparse.data.calibration import fingerprint, load_calibration
    from alsparse.sources import load_model
    from alsparse.strength import heldout_loss, split

    cfg = record["config"]
    if cfg["model"] not in models:
        models[cfg["model"]] = load_model(cfg["model"], dtype=cfg["dtype"])
    dense, tokenizer = models[cfg["model"]]
    calib = record["calibration"]
    ids = load_calibration(tokenizer, calib["windows"], calib["seq_len"], calib["seed"], corpus=cfg["calibration"]["corpus"])
    if fingerprint(ids) != calib["fingerprint"]:
        raise SystemExit(f"cell {record['id']}: the calibration windows differ from the cell's ({calib['fingerprint']})")
    fit, heldout = split(ids)
    alloc = record["allocation"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "allocation.json"
        path.write_text(json.dumps(dict(zip(alloc["units"], alloc["sparsity"]))))
        config = _config(record, str(path))
        model = copy.deepcopy(dense)
        report = prune_(model, fit, config)
    with compute.using(compute.resolve(config.compute_dtype, torch.device("cpu"), torch.float32)):
        fair = heldout_loss(model, heldout, 1)
    search = alloc["search"]
    return {"id": record["id"], "method": cfg["method"], "sparsity": cfg["sparsity"], "seed": cfg["seed"],
            "final": search.get("final"), "assembled_heldout": search.get("assembled_heldout_fitness"),
            "recorded_final_heldout": search.get("final_heldout_nll"),
            "sequential_fit_only_heldout": fair, "achieved_sparsity": report.achieved_sparsity,
            "winner": "assembled" if search["assembled_heldout_fitness"] <= fair else "sequential"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a sweep's results (JSON lines)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--method", help="only cells of this pruner")
    args = parser.parse_args()
    records = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    cells = [r for r in records if r.get("kind") == "pruned" and r["config"]["allocation"] == "search"
             and "search" in r["allocation"] and (args.method is None or r["config"]["method"] == args.method)]
    rows, models = [], {}
    for record in cells:
        row = probe(record, models)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
