"""Perplexity under two named protocols (PROTOCOLS.md); their numbers are never comparable.

token-ppl -- the pruning papers' protocol: the corpus tokenised once, cut into non-overlapping
windows of `seq_len` tokens (tail dropped), loss on positions 1..seq_len-1 of each window,
ppl = exp(mean NLL over all predicted tokens). With a BOS id, each window is [BOS] + seq_len-1 tokens.

word-ppl -- lm-eval's `wikitext` task: each document is scored by `loglikelihood_rolling`
(disjoint windows of `max_length` tokens, one token of context, the first window predicted from
a prefix token), word_perplexity = exp(total NLL / words), byte_perplexity = exp(total NLL / bytes),
bits_per_byte = total NLL / bytes / ln 2; words and bytes are counted on the original document.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.calibration import encode_text, needs_bos
from ..distributed import is_main
from .forward import eval_mode, forward_logits, token_logprobs

log = logging.getLogger(__name__)


def perplexity_windows(ids: torch.Tensor, seq_len: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows `[W, seq_len]` of `ids` (`[n]` or `[1, n]`); the tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    flat = ids.reshape(-1).long()  # [n]
    text_len = seq_len - 1 if bos_token_id is not None else seq_len
    n_windows = flat.numel() // text_len
    windows = flat[: n_windows * text_len].view(n_windows, text_len)  # [W, L]
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_token_id, dtype=torch.long), windows], dim=1)
    return windows  # [W, seq_len]


@torch.inference_mode()
def token_perplexity(
    model: torch.nn.Module,
    ids_or_tokenizer,
    seq_len: int,
    *,
    text: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    bos_token_id: int | None = None,
) -> dict:
    """token-ppl of token ids `[1, n]`, or of `text` encoded by a tokenizer given in their place
    (then without special tokens, and with the tokenizer's BOS per window if `needs_bos`).
    `limit`: score only the first `limit` windows."""
    if isinstance(ids_or_tokenizer, torch.Tensor):
        ids = ids_or_tokenizer
    else:
        if text is None:
            raise ValueError("pass `text` together with a tokenizer")
        ids = encode_text(ids_or_tokenizer, text)
        if bos_token_id is None and needs_bos(ids_or_tokenizer):
            bos_token_id = ids_or_tokenizer.bos_token_id
    windows = perplexity_windows(ids, seq_len, bos_token_id)
    if limit is not None:
        windows = windows[:limit]
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    total_nll, predicted = 0.0, 0
    with eval_mode(model):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="token-ppl", disable=not is_main()):
            batch = windows[start:start + batch_size]  # [B, T]
            logits = forward_logits(model, batch)  # [B, T, V]
            for row in range(batch.shape[0]):
                logprobs = token_logprobs(logits[row, :-1], batch[row, 1:])  # [T-1]
                total_nll -= logprobs.double().sum().item()
                predicted += logprobs.numel()
            del logits
    nll = total_nll / predicted
    log.info("token-ppl %.4f over %d windows of %d tokens", math.exp(nll), windows.shape[0], seq_len)
    return {
        "protocol": "token-ppl",
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": int(windows.shape[0]),
        "seq_len": seq_len,
        "tokens": predicted,
        "corpus_tokens": int(ids.numel()),
        "bos": bos_token_id is not None,
    }


def rolling_windows(tokens: Sequence[int], prefix_token_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(..., context_len=1)` + `make_disjoint_window`:
    (context, continuation) pairs that predict every token exactly once. The first window is
    [prefix] + tokens[:L-1] predicting tokens[:L]; each later window feeds the max_length tokens
    before its end and predicts only the tokens not yet predicted."""
    tokens = list(tokens)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not tokens:
        return []
    first_len = min(max_length, len(tokens))
    pairs = [([prefix_token_id], tokens[:first_len])]
    predicted = first_len
    while predicted < len(tokens):
        pred_len = min(len(tokens) - predicted, max_length)
        end = predicted + pred_len
        window = tokens[end - max_length - 1: end - 1]
        pairs.append((window[: len(window) - (pred_len - 1)], tokens[end - pred_len: end]))
        predicted += pred_len
    return pairs


def continuation_logprob(model: torch.nn.Module, context: list[int], continuation: list[int], max_length: int) -> float:
    """Sum of log p(continuation | context), inputs truncated on the left to max_length (lm-eval)."""
    whole = (context + continuation)[-(max_length + 1):]
    inputs = torch.tensor([whole[:-1]], dtype=torch.long)  # [1, T]
    logits = forward_logits(model, inputs)[0, -len(continuation):]  # [C, V]
    return token_logprobs(logits, torch.tensor(continuation)).double().sum().item()


def count_words(document: str) -> int:
    """lm-eval's wikitext word count: `len(re.split(r"\\s+", page))` (edge whitespace counts as a word)."""
    return len(re.split(r"\s+", document))


@torch.inference_mode()
def word_perplexity(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    max_length: int,
    *,
    limit: int | None = None,
    detokenize: Callable[[str], str] | None = None,
    prefix_token_id: int | None = None,
) -> dict:
    """word-ppl over `documents` (lm-eval `loglikelihood_rolling`). The model scores
    `detokenize(doc)` (or `doc`), encoded without special tokens; words and bytes are counted on
    `doc`. prefix_token_id defaults to lm-eval's: BOS, else EOS. `limit`: first documents only."""
    if prefix_token_id is None:
        prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix_token_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; pass prefix_token_id")
    docs = list(documents)[:limit] if limit is not None else list(documents)
    total_nll, words, n_bytes, n_tokens = 0.0, 0, 0, 0
    with eval_mode(model):
        for doc in tqdm(docs, desc="word-ppl", disable=not is_main()):
            tokens = encode_text(tokenizer, detokenize(doc) if detokenize else doc)[0].tolist()
            for context, continuation in rolling_windows(tokens, prefix_token_id, max_length):
                total_nll -= continuation_logprob(model, context, continuation, max_length)
            words += count_words(doc)
            n_bytes += len(doc.encode("utf-8"))
            n_tokens += len(tokens)
    log.info("word-ppl %.4f over %d documents", math.exp(total_nll / words), len(docs))
    return {
        "protocol": "word-ppl",
        "word_perplexity": math.exp(total_nll / words),
        "byte_perplexity": math.exp(total_nll / n_bytes),
        "bits_per_byte": total_nll / n_bytes / math.log(2),
        "nll": total_nll,
        "words": words,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "documents": len(docs),
        "max_length": max_length,
    }
