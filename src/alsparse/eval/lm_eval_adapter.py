"""Evaluate the same in-memory (pruned) model through EleutherAI's lm-evaluation-harness, offline.

``pip install 'alsparse[eval]'``. The tasks are lm-eval's official definitions over the local data
files (:mod:`alsparse.eval.lm_eval_tasks`), so no hub is needed; the model is wrapped in lm-eval's
HFLM as it is (no copy, no reload).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate_with_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    limit: Optional[int] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    log_samples: bool = False,
    compute_dtype: str = "auto",
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` (zero-shot) on ``tasks`` (alsparse task names, plus
    ``wikitext`` for lm-eval's word perplexity) over the local files. Returns {"harness",
    "version", "results": {task: lm-eval's metrics}, "table": lm-eval's own table, and with
    ``log_samples`` "samples": {task: lm-eval's per-document records} and "task_objects"}.
    ``compute_dtype``: what its forwards run in, as in :func:`alsparse.evaluate`."""
    if not lm_eval_available():
        raise ImportError("the lm-eval harness needs the lm-eval package: pip install 'alsparse[eval]'")
    if not tasks:
        raise ValueError("name at least one task, e.g. ('piqa', 'arc_easy')")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files only: never the hub
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.utils import make_table

    from .. import compute
    from ..models import weights_dtype
    from .forward import model_device
    from .lm_eval_tasks import write_tasks

    with tempfile.TemporaryDirectory(prefix="alsparse-lm-eval-") as directory:
        names = write_tasks(directory, tasks)
        manager = TaskManager(include_path=directory, include_defaults=False)
        kwargs = {"max_length": max_length} if max_length else {}
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        log.info("lm-eval %s on %s (limit %s)", getattr(lm_eval, "__version__", "?"), ", ".join(tasks), limit)
        device = model_device(model)
        dtype = compute.resolve(compute_dtype, device, weights_dtype(model))
        with compute.using(dtype), compute.lowered(device):  # HFLM calls the model itself
            out = lm_eval.simple_evaluate(model=wrapped, tasks=list(names.values()), task_manager=manager,
                                          limit=limit, num_fewshot=0, log_samples=log_samples)
        task_objects = get_task_dict(list(names.values()), manager) if log_samples else {}
    result: dict[str, Any] = {
        "harness": "lm-eval", "version": getattr(lm_eval, "__version__", "?"), "compute_dtype": compute.name(dtype),
        "results": {task: out["results"][name] for task, name in names.items()},
        "table": make_table(out),
    }
    if log_samples:
        result["samples"] = {task: sorted(out["samples"][name], key=lambda s: s["doc_id"])
                             for task, name in names.items()}
        result["task_objects"] = {task: task_objects[name] for task, name in names.items()}
    return result
