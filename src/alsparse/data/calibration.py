"""Calibration windows: `[N, T]` token ids drawn from a corpus disjoint from the evaluation text.

Default corpus: WikiText-2 **validation**, detokenised (C4, the papers' choice, is not available
offline; the evaluation split is WikiText-2 test, so the two never overlap).

Sampling (exact): the corpus is tokenised once without special tokens into `ids [n]`. With
`g = torch.Generator().manual_seed(seed)`, `starts = torch.randint(0, n - L + 1, (N,), generator=g)`
where L = T, or T - 1 when the tokenizer adds a BOS itself (`needs_bos`); window i is
`ids[starts[i] : starts[i] + L]`, preceded by BOS in the latter case. Windows may overlap.
"""

from __future__ import annotations

import hashlib

import torch

from .text import load_corpus

DEFAULT_CORPUS = "wikitext2"
DEFAULT_SPLIT = "validation"


def needs_bos(tokenizer) -> bool:
    """True when the tokenizer prepends BOS itself, i.e. the model expects one at every sequence start."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    encoded = tokenizer("a").input_ids
    return len(encoded) > 0 and encoded[0] == bos


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """`text` tokenised once, without special tokens -> LongTensor `[1, n]`."""
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor([encoded.input_ids], dtype=torch.long)


def sample_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos_token_id: int | None = None
) -> torch.Tensor:
    """`nsamples` seeded random windows of `ids` (`[n]` or `[1, n]`) -> `[nsamples, seqlen]`."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    flat = ids.reshape(-1).long()  # [n]
    text_len = seqlen - 1 if bos_token_id is not None else seqlen
    if flat.numel() < text_len:
        bos_note = " after the BOS token" if bos_token_id is not None else ""
        raise ValueError(
            f"calibration text has {flat.numel()} tokens, but one window of seqlen={seqlen} needs "
            f"{text_len} text tokens{bos_note}; use a longer corpus or a smaller seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, flat.numel() - text_len + 1, (nsamples,), generator=generator)  # [N]
    windows = flat[starts[:, None] + torch.arange(text_len)]  # [N, L]
    if bos_token_id is not None:
        bos_column = torch.full((nsamples, 1), bos_token_id, dtype=torch.long)
        windows = torch.cat([bos_column, windows], dim=1)  # [N, T]
    return windows


def sample_calibration(tokenizer, text: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Calibration token ids `[nsamples, seqlen]` from `text` (see the module docstring)."""
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    return sample_windows(encode_text(tokenizer, text), nsamples, seqlen, seed, bos_token_id=bos)


def load_calibration(
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    corpus: str = DEFAULT_CORPUS,
    split: str = DEFAULT_SPLIT,
) -> torch.Tensor:
    """`sample_calibration` on a registered corpus (default: detokenised WikiText-2 validation)."""
    return sample_calibration(tokenizer, load_corpus(corpus, split), nsamples, seqlen, seed)


def fingerprint(ids: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the ids as contiguous int64 bytes (shape not included)."""
    data = ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
