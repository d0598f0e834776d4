"""How long one causal attention of SmolLM2's shape takes on this CPU (9 query heads, 3 KV heads,
1024 tokens, head dim 64, bf16): torch's SDPA (the CPU flash kernel the model runs) against a
chunked attention written with bf16 matmuls per KV group and an fp32 softmax over 128-query blocks
(not in the package: a measurement of what a replacement could save). Mean of 10 after a warm-up,
and the largest / mean error of each against an fp32 reference.

    .venv/bin/python benchmarks/probe_attention.py

Not a test: nothing here asserts. Run it on an idle machine.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

H, KV, T, D = 9, 3, 1024, 64


def mean_ms(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def chunked(q, k, v, block: int = 128) -> torch.Tensor:
    """Causal attention, queries in blocks of ``block``, each against the keys up to its end."""
    b, g = q.shape[0], H // KV
    grouped = q.reshape(b, KV, g, T, D)
    out = torch.empty(b, KV, g, T, D, dtype=q.dtype)
    for start in range(0, T, block):
        end = min(start + block, T)
        rows = grouped[:, :, :, start:end].reshape(b, KV, g * (end - start), D)
        scores = torch.matmul(rows, k[:, :, :end].transpose(-1, -2)).view(b, KV, g, end - start, end)
        future = ~torch.ones(end - start, end, dtype=torch.bool).tril(start)
        bias = torch.zeros(end - start, end).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores.float().mul_(D**-0.5).add_(bias), dim=-1).to(q.dtype)
        out[:, :, :, start:end] = torch.matmul(probs.view(b, KV, g * (end - start), end), v[:, :, :end]).view(
            b, KV, g, end - start, D)
    return out.view(b, H, T, D)


def main() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, T, D).bfloat16() for n in (H, KV, KV))
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(H // KV, 1),
                                         v.float().repeat_interleave(H // KV, 1), is_causal=True)
    runs = {
        "sdpa (flash, bf16)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "chunked bf16, 128-query blocks": lambda: chunked(q, k, v),
    }
    print("threads:", torch.get_num_threads(), "| capability:", torch.backends.cpu.get_cpu_capability())
    for name, fn in runs.items():
        err = (fn().float() - ref).abs()
        print(f"{name:32s} {mean_ms(fn):6.2f} ms   max err {err.max():.4f}  mean err {err.mean():.5f}")


if __name__ == "__main__":
    main()
