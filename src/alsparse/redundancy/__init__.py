"""Streaming per-unit feature summaries and the Redundancy Metric (RM)."""

from alsparse.redundancy.metric import redundancy_matrix, redundancy_metric
from alsparse.redundancy.summary import FeatureSummary, normalize_columns, select_tokens

__all__ = [
    "FeatureSummary",
    "normalize_columns",
    "redundancy_matrix",
    "redundancy_metric",
    "select_tokens",
]
