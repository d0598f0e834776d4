"""`evaluate(model, tokenizer, EvalConfig(...))`: perplexity and zero-shot tasks, each number named
by its protocol; `format_results` prints one table per protocol (never token-ppl next to word-ppl)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.calibration import encode_text, needs_bos
from ..data.tasks import TASKS, load_task
from ..data.text import CORPORA, documents, load_corpus, wikitext_detokenize
from .. import compute
from ..config import check_compute_dtype
from ..models import weights_dtype
from .forward import model_device, model_max_length
from .perplexity import token_perplexity, word_perplexity
from .zeroshot import score_task

log = logging.getLogger(__name__)
DEFAULT_SEQ_LEN = 2048
# The windows every token-ppl figure in README / docs/RESULTS.md uses (../shared/PROTOCOLS.md:
# WikiText-2 test, the first 40 windows of 1024 tokens). The default above is the papers' seq_len.
HEADLINE_SEQ_LEN, HEADLINE_WINDOWS = 1024, 40


def _positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` measures.

    ppl: corpora for token-ppl (registered names or paths to .txt files), each on its evaluation
        split (wikitext2: test; ptb: validation).
    tasks: zero-shot tasks (see `alsparse.data.tasks.task_names()`).
    seq_len: token-ppl window (default min(model context, 2048)); also word-ppl's max_length when
        given (default: the model context, lm-eval's default).
    limit: first `limit` token-ppl windows, and first `limit` word-ppl documents.
    task_limit: first `task_limit` items of each task.
    batch_size: zero-shot batch size (perplexity runs one window at a time).
    word_ppl: also run lm-eval's `wikitext` word-ppl on the WikiText-2 test documents.
    compute_dtype: the dtype the forwards run in (see `alsparse.compute`; auto = bf16 where the device
        has fast bf16, else the weights' dtype); log-probs are always taken in fp32.
    """

    ppl: tuple[str, ...] = ("wikitext2",)
    tasks: tuple[str, ...] = ()
    seq_len: int | None = None
    limit: int | None = None
    task_limit: int | None = None
    batch_size: int = 8
    word_ppl: bool = False
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_compute_dtype(self.compute_dtype)
        for field in ("ppl", "tasks"):
            value = getattr(self, field)
            object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
        for name in self.ppl:
            if name not in CORPORA and not Path(name).is_file():
                raise ValueError(
                    f"unknown perplexity corpus {name!r}; choose one of: {', '.join(CORPORA.names())}, "
                    f"or the path of an existing .txt file"
                )
        for task in self.tasks:
            TASKS.get(task)  # raises, listing the known tasks
        _positive("seq_len", self.seq_len)
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        _positive("limit", self.limit)
        _positive("task_limit", self.task_limit)
        _positive("batch_size", self.batch_size, allow_none=False)


def resolve_seq_len(model, cfg: EvalConfig) -> int:
    max_positions = model_max_length(model)
    seq_len = cfg.seq_len or min(max_positions or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {max_positions} positions")
    return seq_len


def _token_ppl(model, tokenizer, name: str, seq_len: int, cfg: EvalConfig) -> dict:
    registered = name in CORPORA
    split = CORPORA.get(name).eval_split if registered else "file"
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    ids = encode_text(tokenizer, load_corpus(name))
    result = token_perplexity(model, ids, seq_len, limit=cfg.limit, bos_token_id=bos)
    return {"corpus": name, "split": split, "detokenized": registered and CORPORA.get(name).detokenize, **result}


def evaluate(model, tokenizer, cfg: EvalConfig | None = None) -> dict:
    """{"config", "seq_len", "token_ppl": {corpus: ...}, "word_ppl": {...}, "tasks": {task: ...},
    "tasks_mean": {...} or None, "speed": {"token_ppl:CORPUS": {"seconds", "tokens_per_s"}}}; every
    result carries its "protocol" or "metric_of_record"."""
    cfg = cfg or EvalConfig()
    seq_len = resolve_seq_len(model, cfg)
    dtype = compute.resolve(cfg.compute_dtype, model_device(model), weights_dtype(model))
    results: dict = {"config": asdict(cfg), "seq_len": seq_len, "compute_dtype": compute.name(dtype),
                     "token_ppl": {}, "word_ppl": {}, "tasks": {}, "tasks_mean": None, "speed": {}}
    with compute.using(dtype):
        _measure(model, tokenizer, cfg, seq_len, results)
    return results


def _measure(model, tokenizer, cfg: EvalConfig, seq_len: int, results: dict) -> None:
    for name in cfg.ppl:
        start = time.perf_counter()
        results["token_ppl"][name] = result = _token_ppl(model, tokenizer, name, seq_len, cfg)
        seconds = time.perf_counter() - start  # apart from the results, which compare equal run to run
        results["speed"][f"token_ppl:{name}"] = {"seconds": round(seconds, 2),
                                                 "tokens_per_s": round(result["tokens"] / max(seconds, 1e-9), 1)}
    if cfg.word_ppl:
        max_length = cfg.seq_len or model_max_length(model) or DEFAULT_SEQ_LEN
        result = word_perplexity(model, tokenizer, documents("wikitext2", "test"), max_length,
                                 limit=cfg.limit, detokenize=wikitext_detokenize)
        results["word_ppl"]["wikitext2"] = {"corpus": "wikitext2", "split": "test", **result}
    for task in cfg.tasks:
        items = load_task(task, limit=cfg.task_limit)
        results["tasks"][task] = score_task(model, tokenizer, items, cfg.batch_size, task=task)
    if results["tasks"]:
        values = {task: r["value"] for task, r in results["tasks"].items()}
        results["tasks_mean"] = {
            "value": sum(values.values()) / len(values),
            "metrics": {task: r["metric_of_record"] for task, r in results["tasks"].items()},
        }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    def line(cells): return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]


def format_results(results: dict) -> str:
    """Plain-text tables, one per protocol, each titled with what its numbers mean."""
    blocks: list[list[str]] = []
    if results.get("token_ppl"):
        rows = [[r["corpus"], r["split"], r["seq_len"], r["windows"], r["tokens"], "yes" if r["bos"] else "no",
                 f"{r['ppl']:.4f}"] for r in results["token_ppl"].values()]
        blocks.append(["token-ppl (non-overlapping windows of seq_len tokens, loss on positions 1..seq_len-1, "
                       "ppl = exp(mean NLL))"]
                      + _table(["corpus", "split", "seq_len", "windows", "tokens", "bos", "ppl"], rows))
    if results.get("word_ppl"):
        rows = [[r["corpus"], r["split"], r["max_length"], r["documents"], f"{r['word_perplexity']:.4f}",
                 f"{r['byte_perplexity']:.4f}", f"{r['bits_per_byte']:.4f}"] for r in results["word_ppl"].values()]
        blocks.append(["word-ppl (lm-eval wikitext: rolling log-likelihood per document, "
                       "exp(NLL / words); not comparable with token-ppl)"]
                      + _table(["corpus", "split", "max_length", "documents", "word_ppl", "byte_ppl",
                                "bits_per_byte"], rows))
    if results.get("tasks"):
        rows = [[r["task"], r["n"], r["metric_of_record"], f"{r['value']:.4f}", f"{r['acc']:.4f}",
                 f"{r['acc_norm']:.4f}"] for r in results["tasks"].values()]
        mean = results.get("tasks_mean")
        if mean:
            rows.append(["mean", "", "of record", f"{mean['value']:.4f}", "", ""])
        blocks.append(["zero-shot (lm-eval multiple-choice log-likelihood; value = the task's metric of record)"]
                      + _table(["task", "n", "metric", "value", "acc", "acc_norm"], rows))
    notes = [headline_note(results.get("token_ppl") or {}), compute_note(results.get("compute_dtype"))]
    return "\n\n".join("\n".join(block) for block in blocks) + "".join(f"\n{n}" for n in notes if n)


def compute_note(dtype: str | None) -> str:
    """One line when the forwards ran in another dtype than float32 (the docs' figures)."""
    if dtype in (None, "float32"):
        return ""
    return f"note: the forwards ran in {dtype} (--compute-dtype); log-probs in float32"


def headline_note(token_ppl: dict, flag_prefix: str = "") -> str:
    """One line when a token-ppl figure was measured on other windows than the docs' figures, so
    that nobody compares the two: what the docs use and the flags that reproduce it
    (``flag_prefix="eval-"`` for ``prune --eval``)."""
    other = [r for r in token_ppl.values() if (r["seq_len"], r["windows"]) != (HEADLINE_SEQ_LEN, HEADLINE_WINDOWS)]
    if not other:
        return ""
    seen = sorted({(r["seq_len"], r["windows"]) for r in other})
    here = ", ".join(f"seq_len {n}, {w} windows" for n, w in seen)
    return (f"note: this token-ppl used {here}; the figures in README and docs/RESULTS.md use the first "
            f"{HEADLINE_WINDOWS} windows of {HEADLINE_SEQ_LEN} tokens (--{flag_prefix}seq-len {HEADLINE_SEQ_LEN} "
            f"--{flag_prefix}limit {HEADLINE_WINDOWS}); compare only like with like")
