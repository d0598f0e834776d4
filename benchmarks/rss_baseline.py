"""What the resident memory of a pruning process is made of, before any pruning: the interpreter
with torch + transformers, then the loaded model, then every weight read once (as pruning does).

    python benchmarks/rss_baseline.py
"""

from __future__ import annotations


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20


def main() -> None:
    import torch
    import transformers  # noqa: F401

    print(f"python + torch + transformers imported: {rss_gib():.3f} GiB")
    import alsparse

    model, _ = alsparse.load_model("smollm2-135m")
    print(f"model loaded (weights memory-mapped, mostly untouched): {rss_gib():.3f} GiB")
    with torch.no_grad():
        total = sum(float(p.abs().sum()) for p in model.parameters())  # touch every page
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"every weight read once (fp32 weights {size:.3f} GiB; checksum {total:.1f}): {rss_gib():.3f} GiB")


if __name__ == "__main__":
    main()
