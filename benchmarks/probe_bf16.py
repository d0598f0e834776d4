"""Is bf16 fast on this CPU, and does it change perplexity? Two quick checks in one process:

1. GFLOPS of a 4096 x 576 x 1536 product (SmolLM2's up_proj on 4 windows) through torch.matmul
   and through F.linear (oneDNN), in fp32, bf16 and fp16: the best of 5 after a warm-up.
2. SmolLM2-135M token-ppl on the first 4 windows of 1024 of WikiText-2 test: fp32; the decoder
   blocks under bf16 autocast with the head in fp32; the whole model under bf16 autocast (what
   --compute-dtype bfloat16 runs). Log-probs in fp32, and the wall time of each.

    .venv/bin/python benchmarks/probe_bf16.py

Not a test: nothing here asserts. Run it on an idle machine.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from alsparse import compute
from alsparse.data.calibration import encode_text
from alsparse.data.text import load_corpus
from alsparse.models import decoder_blocks
from alsparse.sources import load_model


def gflops(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 576 * 1536 / best / 1e9


@contextlib.contextmanager
def blocks_in_bf16(model):
    """Each decoder block's forward under bf16 autocast; the embeddings and head stay fp32."""
    blocks = decoder_blocks(model)
    for block in blocks:
        def wrapped(*args, _forward=block.forward, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _forward(*args, **kwargs)
        block.forward = wrapped
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def main() -> None:
    print("bf16 flags:", sorted(compute.cpu_flags()) or "none", "| torch capability:",
          torch.backends.cpu.get_cpu_capability(), "| threads:", torch.get_num_threads())
    a, b = torch.randn(4096, 576), torch.randn(1536, 576)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = a.to(dtype), b.to(dtype)
        print(f"{compute.name(dtype):9s} matmul {gflops(lambda: x @ w.T):6.1f} GFLOPS   "
              f"F.linear {gflops(lambda: F.linear(x, w)):6.1f} GFLOPS")
    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    model.eval()
    ids = encode_text(tokenizer, load_corpus("wikitext2"))[0, : 4 * 1024].reshape(4, 1024)
    modes = {"fp32": contextlib.nullcontext, "bf16 blocks, fp32 head": lambda: blocks_in_bf16(model),
             "bf16 everything": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for label, context in modes.items():
        start, nll = time.perf_counter(), 0.0
        with torch.no_grad(), context():
            for window in ids:
                logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
                nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
        ppl = torch.tensor(nll / (4 * 1023)).exp().item()
        print(f"{label:24s} ppl {ppl:.4f}  {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
