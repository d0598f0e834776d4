"""Plumbing shared by the evaluators: device, context length, eval mode, fp32 token log-probs."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import compute

CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
LOGPROB_CHUNK = 1024  # positions per fp32 log-softmax: bounds the temporary to [1024, V] floats


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def model_max_length(model: torch.nn.Module) -> int | None:
    """The model's context length from its config (None when the config does not say)."""
    config = getattr(model, "config", None)
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model.eval()` for the duration; the previous training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def forward_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`model(input_ids=...).logits` `[B, T, V]` without a KV cache."""
    device = model_device(model)
    kwargs = {"input_ids": input_ids.to(device), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    with compute.lowered(device):  # the active compute dtype (evaluate sets it); log-probs stay fp32
        return model(**kwargs).logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[t] | logits[t]) in fp32 -> `[T]`; logits `[T, V]`, targets `[T]`.

    Computed in chunks of LOGPROB_CHUNK positions so that no fp32 copy of all logits exists.
    """
    targets = targets.to(logits.device)
    pieces = []
    for start in range(0, logits.shape[0], LOGPROB_CHUNK):
        chunk = slice(start, start + LOGPROB_CHUNK)
        pieces.append(-F.cross_entropy(logits[chunk].float(), targets[chunk], reduction="none"))
    return torch.cat(pieces) if pieces else logits.new_zeros(0, dtype=torch.float32)
