"""One llm-compressor ``oneshot`` prune, run by benchmarks/bench_llmcompressor.py inside the peer's own
virtual environment (llmcompressor pins transformers <= 5.17, ours is newer). Not imported by alsparse.

    PEER_VENV/bin/python benchmarks/llmcompressor_worker.py SPEC.json

SPEC: {"model": HF dir, "windows": .pt file of int64 [N, T] token ids, "method": wanda|sparsegpt,
"sparsity": float, "pattern": "unstructured"|"N:M", "owl": {"m": .., "lambda": ..} or null, "out": dir,
"result": .json path}. The calibration is handed over as a dataset of input_ids (no tokenisation, no
shuffling); a pre-hook on the token embedding records every window the peer actually ran, and the
result carries their fingerprint (sha256 of the sorted windows), which the driver compares with ours.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path


def sorted_fingerprint(windows) -> str:
    """sha256 (16 hex digits) of the windows as int64 rows in lexicographic order (order-free)."""
    rows = sorted(tuple(int(t) for t in row) for row in windows.tolist())
    import numpy as np

    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    windows = torch.load(spec["windows"])  # [N, T] int64
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    load_s = time.perf_counter() - t_load

    seen = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})

    mask = "0:0" if spec["pattern"] == "unstructured" else spec["pattern"]
    common = dict(sparsity=spec["sparsity"], mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])
    if spec.get("owl"):
        common.update(sparsity_profile="owl", owl_m=spec["owl"]["m"], owl_lmbda=spec["owl"]["lambda"])
    if spec["method"] == "wanda":
        recipe = WandaPruningModifier(**common)
    elif spec["method"] == "sparsegpt":
        recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    else:
        raise SystemExit(f"unknown method {spec['method']!r}: wanda | sparsegpt")

    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=int(windows.shape[0]), max_seq_length=int(windows.shape[1]),
            shuffle_calibration_samples=False, batch_size=1)
    prune_s = time.perf_counter() - start
    handle.remove()

    seen = [t for t in seen if t.device.type != "meta"]  # the pipeline's tracing pass runs on meta tensors
    ran = torch.cat(seen) if seen else torch.empty(0, windows.shape[1], dtype=torch.long)
    # the OWL profile runs the calibration once more to score outliers: count distinct windows
    distinct = torch.unique(ran, dim=0) if ran.numel() else ran
    out = Path(spec["out"])
    model.save_pretrained(out, save_compressed=False)  # dense safetensors any transformers reloads
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    dropped = [k for k in ("quantization_config", "sparsity_config", "compression_config") if k in config]
    for k in dropped:
        config.pop(k)
    config_path.write_text(json.dumps(config, indent=2))
    Path(spec["result"]).write_text(json.dumps({
        "load_s": round(load_s, 2), "oneshot_s": round(prune_s, 2),
        "windows_run": int(ran.shape[0]), "distinct_windows": int(distinct.shape[0]),
        "fingerprint_sorted": sorted_fingerprint(distinct) if distinct.numel() else None,
        "config_keys_dropped": dropped,
        "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
