"""alsparse: Adaptive Layer Sparsity pruning for large language models.

    report = alsparse.prune_(model, calibration_ids, alsparse.PruneConfig(method="wanda", sparsity=0.6, allocation="als"))
    alsparse.save(model, tokenizer, report, "out/model-als60")
    scores = alsparse.evaluate(model, tokenizer, alsparse.EvalConfig(ppl=("wikitext2",), tasks=("arc_easy",)))
"""

__version__ = "0.1.0"

from .allocate import ALLOCATORS  # noqa: E402
from .api import prune_  # noqa: E402
from .config import ALSOptions, BaselineOptions, Pattern, PruneConfig  # noqa: E402
from .eval import EvalConfig, evaluate  # noqa: E402
from .io import measure_sparsity, save  # noqa: E402
from .pruning import PRUNERS  # noqa: E402
from .report import PruneReport  # noqa: E402
from .sources import load_model  # noqa: E402

__all__ = [
    "ALLOCATORS",
    "ALSOptions",
    "BaselineOptions",
    "EvalConfig",
    "PRUNERS",
    "Pattern",
    "PruneConfig",
    "PruneReport",
    "evaluate",
    "load_model",
    "measure_sparsity",
    "prune_",
    "save",
    "__version__",
]
