"""Evaluation: token-ppl and word-ppl (named protocols), zero-shot multiple-choice tasks."""

from .api import EvalConfig, evaluate, format_results
from .perplexity import perplexity_windows, rolling_windows, token_perplexity, word_perplexity
from .zeroshot import encode_pair, score_items, score_requests, score_task

__all__ = [
    "EvalConfig",
    "encode_pair",
    "evaluate",
    "format_results",
    "perplexity_windows",
    "rolling_windows",
    "score_items",
    "score_requests",
    "score_task",
    "token_perplexity",
    "word_perplexity",
]
