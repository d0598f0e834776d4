"""Corpora, calibration windows and zero-shot task files, read locally (see paths.py)."""

from .calibration import (
    encode_text,
    fingerprint,
    load_calibration,
    needs_bos,
    sample_calibration,
    sample_windows,
)
from .paths import data_dir, data_file
from .tasks import MultipleChoiceItem, load_task, metric_of_record, parse_task_file, task_names
from .text import CORPORA, documents, load_corpus, wikitext_detokenize

__all__ = [
    "CORPORA",
    "MultipleChoiceItem",
    "data_dir",
    "data_file",
    "documents",
    "encode_text",
    "fingerprint",
    "load_calibration",
    "load_corpus",
    "load_task",
    "metric_of_record",
    "needs_bos",
    "parse_task_file",
    "sample_calibration",
    "sample_windows",
    "task_names",
    "wikitext_detokenize",
]
