"""Evaluate the same in-memory model through EleutherAI's lm-evaluation-harness (optional extra).

``pip install 'alsparse[eval]'``. The harness loads its task data from the Hugging Face hub, so
this path is for online users; the built-in evaluator (``alsparse.evaluate``) works offline.
"""

from __future__ import annotations

import logging
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
    num_fewshot: int = 0,
) -> dict[str, Any]:
    """Wrap the model in lm-eval's HFLM (no copy, no reload) and run ``simple_evaluate``."""
    if not lm_eval_available():
        raise ImportError("the lm-eval adapter needs the lm-eval package: pip install 'alsparse[eval]'")
    if not tasks:
        raise ValueError("name at least one lm-eval task, e.g. ('piqa', 'arc_easy')")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    log.info("lm-eval %s on %s (limit %s)", getattr(lm_eval, "__version__", "?"), ",".join(tasks), limit)
    out = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    return {"harness": "lm-eval", "results": out.get("results", {}), "versions": out.get("versions", {})}
