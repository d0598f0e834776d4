"""alsparse: Adaptive Layer Sparsity pruning for large language models.

    report = alsparse.prune_(model, calibration_ids, alsparse.PruneConfig(method="wanda", sparsity=0.6, allocation="als"))
    alsparse.save(model, tokenizer, report, "out/model-als60")
    scores = alsparse.evaluate(model, tokenizer, alsparse.EvalConfig(ppl=("wikitext2",), tasks=("arc_easy",)))
"""

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so that ``alsparse --help`` and a usage
# mistake are answered before torch and transformers load (seconds on a small machine).
_EXPORTS = {
    "ALLOCATORS": "allocate",
    "prune_": "api",
    "ALSOptions": "config",
    "BaselineOptions": "config",
    "Pattern": "config",
    "PruneConfig": "config",
    "EvalConfig": "eval",
    "evaluate": "eval",
    "measure_sparsity": "io",
    "save": "io",
    "PRUNERS": "pruning",
    "PruneReport": "report",
    "load_model": "sources",
}


def __getattr__(name: str):
    import importlib

    module = _EXPORTS.get(name)
    if module is None:  # a submodule (alsparse.sweep, alsparse.io, ...), as the eager imports once gave
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'alsparse' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
