"""Zero-shot multiple-choice scoring as lm-eval's `loglikelihood` + `multiple_choice` do it.

Each choice is a (context, continuation) pair. Encoding (lm-eval `_encode_pair`): trailing
whitespace of the context moves to the continuation; whole = encode(context + continuation),
context_enc = encode(context), continuation tokens = whole[len(context_enc):], without special
tokens. An empty context becomes [BOS or EOS] (lm-eval's prefix token); when the tokenizer adds a
BOS itself (`needs_bos`) every context starts with BOS. Inputs are truncated on the left to the
model's context. Score = sum of the continuation tokens' log-probs (fp32);
acc = [argmax score == gold]; acc_norm = [argmax score / len(choice text) == gold].

Batching: requests are sorted by length (longest first), right-padded to the longest of each
batch with an attention mask, and each row's continuation logits are gathered at its own
positions, so batched scores equal one-at-a-time scores up to float rounding.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.calibration import needs_bos
from ..data.tasks import TASKS, MultipleChoiceItem, metric_of_record
from ..distributed import is_main
from .forward import eval_mode, forward_logits, model_max_length, token_logprobs

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when the model config names no context length


def encode_pair(tokenizer, context: str, continuation: str, prefix: list[int]) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval encodes them; `prefix` is [] or [BOS]."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        start = prefix or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        return start, tokenizer(continuation, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_enc = tokenizer(context, add_special_tokens=False).input_ids
    return prefix + context_enc, whole[len(context_enc):]


def _score_batch(model, batch: list[tuple[list[int], int]], pad_id: int) -> list[float]:
    """batch: (context + continuation tokens, continuation length) -> summed continuation log-probs.
    The input is all tokens but the last; continuation token j is predicted at input position
    L - C + j (L = input length, C = continuation length)."""
    lengths = [len(whole) - 1 for whole, _ in batch]
    input_ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros_like(input_ids)  # [B, T]
    for row, (whole, _) in enumerate(batch):
        input_ids[row, :lengths[row]] = torch.tensor(whole[:-1])
        attention_mask[row, :lengths[row]] = 1
    logits = forward_logits(model, input_ids, attention_mask if len(batch) > 1 else None)  # [B, T, V]
    scores = []
    for row, (whole, n_cont) in enumerate(batch):
        cont_logits = logits[row, lengths[row] - n_cont:lengths[row]]  # [C, V]
        scores.append(token_logprobs(cont_logits, torch.tensor(whole[-n_cont:])).double().sum().item())
    return scores


@torch.inference_mode()
def score_requests(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                   max_length: int = DEFAULT_MAX_LENGTH, pad_id: int = 0) -> list[float]:
    """Sum of log p(continuation | context) per (context tokens, continuation tokens) request."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prepared = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a continuation encodes to no tokens")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        prepared.append((whole, min(len(continuation), len(whole) - 1)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    scores = [0.0] * len(prepared)
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not is_main()):
            chunk = order[start:start + batch_size]
            for index, score in zip(chunk, _score_batch(model, [prepared[i] for i in chunk], pad_id)):
                scores[index] = score
    return scores


def _stderr(hits: Sequence[bool]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n)."""
    n = len(hits)
    if n < 2:
        return float("nan")
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index among ties, like np.argmax


def score_items(model, tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 8) -> list[list[float]]:
    """Per item, the summed continuation log-prob of every choice."""
    prefix = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    requests, owners = [], []
    for item_index, item in enumerate(items):
        for context, continuation in item.pairs():
            requests.append(encode_pair(tokenizer, context, continuation, prefix))
            owners.append(item_index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = model_max_length(model) or DEFAULT_MAX_LENGTH
    flat = score_requests(model, requests, batch_size=batch_size, max_length=max_length, pad_id=pad_id)
    per_item: list[list[float]] = [[] for _ in items]
    for owner, score in zip(owners, flat):
        per_item[owner].append(score)
    return per_item


def score_task(model, tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 8,
               limit: int | None = None, *, task: str = "custom") -> dict:
    """acc and acc_norm of `items` (the first `limit`); `task` names the result and, for a
    registered task, its metric of record (else "acc")."""
    items = list(items)[:limit] if limit is not None else list(items)
    if not items:
        raise ValueError(f"task {task!r} has no items to score")
    scores = score_items(model, tokenizer, items, batch_size=batch_size)
    hits = [_argmax(s) == item.gold for s, item in zip(scores, items)]
    hits_norm = [
        _argmax([score / length for score, length in zip(s, item.norm_lengths())]) == item.gold
        for s, item in zip(scores, items)
    ]
    metric = metric_of_record(task) if task in TASKS else "acc"
    result = {
        "task": task,
        "n": len(items),
        "acc": sum(hits) / len(items),
        "acc_stderr": _stderr(hits),
        "acc_norm": sum(hits_norm) / len(items),
        "acc_norm_stderr": _stderr(hits_norm),
        "metric_of_record": metric,
    }
    result["value"] = result[metric]
    log.info("%s: acc %.4f acc_norm %.4f (n=%d)", task, result["acc"], result["acc_norm"], len(items))
    return result
